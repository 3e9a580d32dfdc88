"""Folding is exact: property tests over layer configurations, every zoo model, every refusal."""

from __future__ import annotations

import copy
import subprocess

import pytest
import torch
from helpers import PYTHON, assert_clean_error
from hypothesis import HealthCheck, example, given, settings
from hypothesis import strategies as st
from torch import nn

from bntool import zoo
from bntool.checkpoint import load_checkpoint
from bntool.errors import CheckFailed
from bntool.folding import AFFINE, FOLDED, FOLDED_FORWARD, MAX_FORWARD_FOLD_MEAN, REFUSED, fold, mean_in_stds
from bntool.layers import ChannelAffine

ULPS = 8 * torch.finfo(torch.float32).eps


def reference64(model: nn.Module, x: torch.Tensor) -> torch.Tensor:
    """The unfolded model run in float64: the independent reference for folded outputs."""
    m = copy.deepcopy(model).double().eval()
    with torch.no_grad():
        return m(x.double())


def rounding_budget(layer: nn.Module, x: torch.Tensor, gain: float = 1.0) -> float:
    """The classic bound on float32 rounding in a conv/linear output: (n+1)·u·max(Σ|w·x| + |b|) for n summed
    terms, times the gain of what follows. Folding scales the terms by γ/σ, so a tiny variance scales it too."""
    bound = copy.deepcopy(layer).double()
    with torch.no_grad():
        bound.weight.abs_()
        if bound.bias is not None:
            bound.bias.abs_()
        magnitude = float(bound(x.double().abs()).max())
    w = layer.weight
    if isinstance(layer, nn.modules.conv._ConvTransposeNd):
        terms = w.shape[0] // layer.groups * w[0, 0].numel()
    else:
        terms = w[0].numel()
    return (terms + 1) * torch.finfo(torch.float32).eps * magnitude * gain


def affine_rounding_budget(affine: ChannelAffine, x: torch.Tensor, gain: float) -> float:
    """The same bound for (x - c)·s + t: three rounded operations per element, times the gain that follows."""
    view = [1, -1] + [1] * (x.dim() - 2)
    s, t = affine.scale.double().view(view), affine.shift.double().view(view)
    c = affine.center.double().view(view) if affine.center is not None else 0.0
    magnitude = float(((x.double() - c).abs() * s.abs() + t.abs()).max())
    return 3 * torch.finfo(torch.float32).eps * magnitude * gain


def assert_exact_in_float64(model: nn.Module, x: torch.Tensor) -> None:
    """The fold's math, free of float32 rounding: folded float64 equals the unfolded float64 model."""
    model64 = copy.deepcopy(model).double()
    folded64, _ = fold(model64, x.double())
    ref = reference64(model, x)
    with torch.no_grad():
        assert (folded64(x.double()) - ref).abs().max() <= 1e-10 * ref.abs().max().clamp(min=1)


def random_stats(bn: nn.Module, g: torch.Generator, tiny_var: bool) -> None:
    c = bn.running_mean.numel()
    with torch.no_grad():
        bn.running_mean.copy_(torch.randn(c, generator=g))
        var = torch.rand(c, generator=g) * 3 + 0.05
        if tiny_var:
            var[: max(1, c // 3)] = 1e-7  # below eps: the fold must use eps exactly
        bn.running_var.copy_(var)
        if bn.affine:
            bn.weight.copy_(torch.randn(c, generator=g))
            bn.bias.copy_(torch.randn(c, generator=g))


# ---------------------------------------------------------------- property tests


@st.composite
def conv_configs(draw):
    dims = draw(st.sampled_from([1, 2, 3]))
    transpose = draw(st.booleans())
    groups = draw(st.sampled_from([1, 2, 4]))
    cin = groups * draw(st.integers(1, 3))
    cout = groups * draw(st.integers(1, 3))
    depthwise = draw(st.booleans())
    if depthwise and not transpose:
        groups, cout = cin, cin * draw(st.integers(1, 2))
    k = draw(st.integers(1, 3))
    stride = draw(st.integers(1, 2))
    dilation = draw(st.integers(1, 2))
    if transpose:
        padding = draw(st.integers(0, (k - 1) * dilation // 2))
        mode, pad_arg = "zeros", padding
    else:
        mode = draw(st.sampled_from(["zeros", "reflect", "replicate", "circular"]))
        pad_arg = draw(st.sampled_from([0, 1, "same"] if stride == 1 else [0, 1]))
    return dict(dims=dims, transpose=transpose, groups=groups, cin=cin, cout=cout, k=k, stride=stride,
                dilation=dilation, padding=pad_arg, mode=mode, bias=draw(st.booleans()),
                affine=draw(st.booleans()), eps=draw(st.sampled_from([1e-5, 1e-3, 0.1])),
                tiny_var=draw(st.booleans()), seed=draw(st.integers(0, 10_000)))


def build_conv_bn(c):
    conv_cls = {(1, False): nn.Conv1d, (2, False): nn.Conv2d, (3, False): nn.Conv3d,
                (1, True): nn.ConvTranspose1d, (2, True): nn.ConvTranspose2d, (3, True): nn.ConvTranspose3d}
    bn_cls = {1: nn.BatchNorm1d, 2: nn.BatchNorm2d, 3: nn.BatchNorm3d}[c["dims"]]
    kwargs = dict(stride=c["stride"], padding=c["padding"], dilation=c["dilation"], groups=c["groups"],
                  bias=c["bias"])
    if not c["transpose"]:
        kwargs["padding_mode"] = c["mode"]
    torch.manual_seed(c["seed"])
    conv = conv_cls[(c["dims"], c["transpose"])](c["cin"], c["cout"], c["k"], **kwargs)
    bn = bn_cls(c["cout"], eps=c["eps"], affine=c["affine"])
    random_stats(bn, torch.Generator().manual_seed(c["seed"]), c["tiny_var"])
    return nn.Sequential(conv, bn).eval()


@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(conv_configs())
def test_conv_bn_fold_is_exact(c):
    model = build_conv_bn(c)
    x = torch.randn(2, c["cin"], *[7] * c["dims"], generator=torch.Generator().manual_seed(c["seed"]))
    folded, report = fold(model, x, samples=1)
    assert [d.action for d in report.decisions] == [FOLDED]
    assert report.batch_norm_ops_after == 0
    assert isinstance(folded[1], nn.Identity) and folded[0].bias is not None
    assert_exact_in_float64(model, x)
    ref = reference64(model, x)
    with torch.no_grad():
        err_folded = (folded(x).double() - ref).abs().max()
        err_plain = (model(x).double() - ref).abs().max()
    # Folded float32 is as accurate as the unfolded float32 model, up to the folded conv's own rounding.
    assert err_folded <= 1.5 * err_plain + rounding_budget(folded[0], x)


@st.composite
def linear_configs(draw):
    return dict(fin=draw(st.integers(1, 12)), fout=draw(st.integers(1, 12)), bias=draw(st.booleans()),
                affine=draw(st.booleans()), eps=draw(st.sampled_from([1e-5, 1e-2])), tokens=draw(st.booleans()),
                forward=draw(st.booleans()), tiny_var=draw(st.booleans()), seed=draw(st.integers(0, 10_000)))


class TokenLinearBN(nn.Module):
    def __init__(self, c):
        super().__init__()
        self.c = c
        self.fc = nn.Linear(c["fin"], c["fout"], bias=c["bias"])
        self.bn = nn.BatchNorm1d(c["fin"] if c["forward"] else c["fout"], eps=c["eps"], affine=c["affine"])
        self.fc2 = nn.Linear(c["fout"], 3)

    def forward(self, x):  # x: (B, L, fin) with tokens, else (B, fin)
        if self.c["forward"]:  # BN → Linear: folds forward into fc
            y = self.bn(x.transpose(1, 2)).transpose(1, 2) if self.c["tokens"] else self.bn(x)
            return self.fc2(torch.tanh(self.fc(y)))
        y = self.fc(x)
        y = self.bn(y.transpose(1, 2)).transpose(1, 2) if self.c["tokens"] else self.bn(y)
        return self.fc2(torch.tanh(y))


@settings(max_examples=40, deadline=None)
@given(linear_configs())
# Tiny variance (γ/σ ≈ 316) before tanh: rounding in the folded fc is amplified, as in the unfolded model.
@example(c=dict(fin=12, fout=12, bias=False, affine=False, eps=1e-5, tokens=True, forward=False, tiny_var=True,
                seed=3113))
# ... and before a centered affine: a mean 680 standard deviations from zero, at a model input.
@example(c=dict(fin=6, fout=6, bias=True, affine=True, eps=1e-5, tokens=True, forward=True, tiny_var=True, seed=2701))
def test_linear_bn_fold_is_exact(c):
    torch.manual_seed(c["seed"])
    model = TokenLinearBN(c).eval()
    random_stats(model.bn, torch.Generator().manual_seed(c["seed"]), c["tiny_var"])
    shape = (3, 5, c["fin"]) if c["tokens"] else (4, c["fin"])
    x = torch.randn(shape, generator=torch.Generator().manual_seed(c["seed"] + 1))
    folded, report = fold(model, x, samples=1)
    if not c["forward"]:
        expected = (FOLDED, "fc")
    elif mean_in_stds(model.bn) <= MAX_FORWARD_FOLD_MEAN:
        expected = (FOLDED_FORWARD, "fc")
    else:  # folding forward would amplify rounding: a centered affine keeps full precision
        expected = (AFFINE, None)
        assert folded.bn.center is not None
    assert (report.decisions[0].action, report.decisions[0].target) == expected
    assert report.batch_norm_ops_after == 0
    assert_exact_in_float64(model, x)
    ref = reference64(model, x)
    # Rounding in the folded fc (or the affine before it) reaches the output through tanh (slope ≤ 1) and fc2.
    gain = float(model.fc2.weight.detach().abs().sum(1).max())
    slack = 1e-6
    if expected[0] == AFFINE:
        bn_input = x.transpose(1, 2) if c["tokens"] else x
        slack += affine_rounding_budget(folded.bn, bn_input, gain * float(model.fc.weight.detach().abs().sum(1).max()))
    else:
        slack += rounding_budget(folded.fc, x, gain)
    with torch.no_grad():
        assert (folded(x).double() - ref).abs().max() <= 1.5 * (model(x).double() - ref).abs().max() + slack


# ---------------------------------------------------------------- the zoo


EXPECTED_ACTIONS = {
    "resnet": {FOLDED: 6}, "resnext": {FOLDED: 6}, "mobilenet": {FOLDED: 10}, "decoder": {FOLDED: 3},
    "conv1d": {FOLDED: 3}, "conv3d": {FOLDED: 2}, "mlp": {FOLDED: 2, FOLDED_FORWARD: 1}, "tokens": {FOLDED: 2},
    "preact": {FOLDED: 1, FOLDED_FORWARD: 2, AFFINE: 1}, "shared": {AFFINE: 1}, "reused": {FOLDED: 1, AFFINE: 2},
    "subclass": {FOLDED: 3}, "nobn": {},
}


@pytest.mark.parametrize("name", list(zoo.ZOO))
def test_zoo_model_folds_exactly(name):
    model = zoo.build(name)
    x = zoo.example_input(name)
    before = copy.deepcopy(model.state_dict())
    folded, report = fold(model, x, samples=2)
    counts = {a: report.count(a) for a in (FOLDED, FOLDED_FORWARD, AFFINE, REFUSED) if report.count(a)}
    assert counts == EXPECTED_ACTIONS[name]
    assert report.batch_norm_ops_after == 0 and report.passed
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())  # original untouched
    ref = reference64(model, x)
    with torch.no_grad():
        err_folded = (folded(x).double() - ref).abs().max()
        err_plain = (model(x).double() - ref).abs().max()
    # Within 1.5x the unfolded model's own float32 error, or a few float32 ulps of the output scale.
    assert err_folded <= 1.5 * err_plain + ULPS * ref.abs().max()


def test_bn_subclass_keeps_its_activation():
    model = zoo.build("subclass")
    folded, _ = fold(model, zoo.example_input("subclass"))
    assert isinstance(folded.bn1, zoo.BatchNormAct2d) and isinstance(folded.bn1.act, nn.SiLU)
    x = torch.randn(2, 8, 5, 5)
    # With normalization folded away, the module is now exactly its activation.
    assert torch.equal(folded.bn1(x), torch.nn.functional.silu(x))


def test_centered_affine_state_dict_roundtrip(tmp_path):
    model = zoo.build("mlp")
    with torch.no_grad():
        model.in_bn.running_mean.fill_(100.0)  # raw features far from zero: the input BN cannot fold forward
    x = zoo.example_input("mlp") + 100
    folded, report = fold(model, x, samples=0)
    assert {d.name: d.action for d in report.decisions}["in_bn"] == AFFINE
    assert report.layout.centered == ["in_bn"]
    from bntool.checkpoint import state_dict_of

    path = tmp_path / "f.pt"
    torch.save(state_dict_of(folded), path)
    reloaded = load_checkpoint(path, arch="bntool.zoo:MLPBN").model.eval()
    with torch.no_grad():
        assert torch.equal(reloaded(x), folded(x))


def test_affine_replacement_and_reasons():
    folded, report = fold(zoo.build("shared"), zoo.example_input("shared"))
    assert isinstance(folded.bn, ChannelAffine)
    assert "also read by add" in report.decisions[0].reason


def test_zero_padded_consumer_is_not_forward_folded():
    _, report = fold(zoo.build("preact"), zoo.example_input("preact"))
    by_name = {d.name: d for d in report.decisions}
    assert by_name["bn_pad"].action == AFFINE and "zero-pads" in by_name["bn_pad"].reason
    assert by_name["bn_after_act"].action == FOLDED_FORWARD  # replicate padding copies BN outputs: exact


class WeightStd(nn.Conv2d):
    """Weight standardization: scaling the weight would be normalized away, so folding into it is wrong."""

    def forward(self, x):
        w = (self.weight - self.weight.mean((1, 2, 3), keepdim=True)) / self.weight.std((1, 2, 3), keepdim=True)
        return nn.functional.conv2d(x, w, self.bias, self.stride, self.padding)


def test_weight_transforming_conv_is_not_folded_into():
    model = nn.Sequential(WeightStd(3, 4, 3), nn.BatchNorm2d(4)).eval()
    random_stats(model[1], torch.Generator().manual_seed(0), False)
    folded, report = fold(model, torch.randn(2, 3, 8, 8))
    assert report.decisions[0].action == AFFINE and "transforms its weight" in report.decisions[0].reason


def test_shared_weights_are_not_folded_into():
    a, b = nn.Conv2d(3, 3, 1), nn.Conv2d(3, 3, 1)
    b.weight = a.weight
    model = nn.Sequential(a, nn.BatchNorm2d(3), nn.ReLU(), b).eval()
    random_stats(model[1], torch.Generator().manual_seed(0), False)
    _, report = fold(model, torch.randn(2, 3, 4, 4))
    assert report.decisions[0].action == AFFINE and "shared" in report.decisions[0].reason


@pytest.mark.parametrize("case", ["training", "no_stats", "nan", "skip"])
def test_refusals(case):
    model = zoo.build("resnet")
    bn = model.layer1.bn1
    skip = ()
    if case == "training":
        bn.train()
    elif case == "no_stats":
        bn.track_running_stats = False
        bn.running_mean = bn.running_var = None
    elif case == "nan":
        with torch.no_grad():
            bn.running_var[0] = float("nan")
    else:
        skip = ("layer1.*",)
    folded, report = fold(model, zoo.example_input("resnet"), skip=skip, check=case != "nan")
    decision = {d.name: d for d in report.decisions}["layer1.bn1"]
    assert decision.action == REFUSED, decision
    assert isinstance(folded.layer1.bn1, nn.BatchNorm2d)
    assert report.batch_norm_ops_after >= 1


def broken_fold(monkeypatch):
    """Simulate a wrong fold (a 1% scale error) to test the safety net."""
    import bntool.folding as folding

    real = folding.fold_into_producer
    monkeypatch.setattr(folding, "fold_into_producer", lambda layer, s, t: real(layer, s * 1.01, t))


def test_wrong_fold_raises_check_failed(monkeypatch):
    broken_fold(monkeypatch)
    with pytest.raises(CheckFailed) as info:
        fold(zoo.build("resnet"), zoo.example_input("resnet"), samples=2)
    report = info.value.report
    assert report.max_abs_over_scale > 1e-3 and not report.passed
    assert report.comparisons[0].float64_error_candidate > 1.5 * report.comparisons[0].float64_error_original


def test_rounding_differences_are_judged_against_float64():
    """With zero tolerance the float32 outputs always differ; the float64 reference decides."""
    _, report = fold(zoo.build("resnet"), zoo.example_input("resnet"), rtol=0, atol=0, samples=2)
    assert report.passed
    c = report.comparisons[0]
    assert c.float64_error_candidate <= 1.5 * c.float64_error_original


@pytest.mark.parametrize("dtype,tol", [(torch.float64, 1e-12), (torch.bfloat16, 5e-2)])
def test_other_dtypes(dtype, tol):
    model = zoo.build("resnet").to(dtype)
    x = zoo.example_input("resnet", dtype=dtype)
    folded, report = fold(model, x, samples=1)
    assert folded.stem[0].weight.dtype == dtype and report.passed
    ref = reference64(model, x)
    assert (folded(x).double() - ref).abs().max() <= tol * ref.abs().max() + (model(x).double() - ref).abs().max()


def test_folded_state_dict_loads_in_a_fresh_process(tmp_path, cli):
    src = tmp_path / "subclass.pt"
    torch.save(zoo.build("subclass").state_dict(), src)
    out = tmp_path / "folded.pt"
    result = cli("fold", src, "--arch", "bntool.zoo:SubclassNet", "--input-shape", "2,3,17,17", "-o", out)
    assert result.code == 0, result.err
    torch.save(zoo.example_input("subclass"), tmp_path / "x.pt")
    script = (
        "import torch, bntool\n"
        f"m = bntool.load_model({str(out)!r}, arch='bntool.zoo:SubclassNet')\n"
        f"x = torch.load({str(tmp_path / 'x.pt')!r})\n"
        "ops = []\n"
        "print(float(m(x).abs().sum()))\n"
    )
    got = subprocess.run([PYTHON, "-c", script], capture_output=True, text=True, check=True).stdout
    with torch.no_grad():
        expected = float(zoo.build("subclass")(zoo.example_input("subclass")).abs().sum())
    assert abs(float(got) - expected) <= 1e-4 * abs(expected)


def test_whole_module_roundtrip(tmp_path, cli):
    src = tmp_path / "module.pt"
    torch.save(zoo.build("subclass"), src)
    out = tmp_path / "folded.pt"
    result = cli("fold", src, "--trust-pickle", "--input-shape", "2,3,17,17", "-o", out, "--json")
    assert result.code == 0, result.err
    loaded = torch.load(out, weights_only=False)
    x = zoo.example_input("subclass")
    with torch.no_grad():
        assert torch.allclose(loaded(x), zoo.build("subclass")(x), rtol=1e-4, atol=1e-5)
    assert load_checkpoint(out, trust_pickle=True).kind == "module"


def test_cli_fold_mismatch_writes_nothing(tmp_path, cli, resnet_sd, monkeypatch):
    broken_fold(monkeypatch)
    out = tmp_path / "out.pt"
    result = cli("fold", resnet_sd, "--arch", "bntool.zoo:resnet", "--input-shape", "2,3,32,32", "-o", out)
    assert result.code == 1 and "nothing written" in result.err and not out.exists()


def test_cli_bad_input_shape(tmp_path, cli, resnet_sd):
    out = tmp_path / "out.pt"
    assert_clean_error(cli("fold", resnet_sd, "--arch", "bntool.zoo:resnet", "--input-shape", "2,5,32,32",
                           "-o", out), contains="does not accept --input-shape")
    assert_clean_error(cli("fold", resnet_sd, "--arch", "bntool.zoo:resnet", "--input-shape", "2,a", "-o", out),
                       contains="comma-separated")
    assert not out.exists()
