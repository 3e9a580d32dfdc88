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
from bntool.errors import CheckFailed, InputError
from bntool.folding import (
    AFFINE,
    FOLDED,
    FOLDED_FORWARD,
    MAX_FORWARD_FOLD_MEAN,
    REFUSED,
    fold,
    mean_in_stds,
    plan_fold,
)
from bntool.layers import ChannelAffine, DepthwiseAffine, FoldedNormAct

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
    layer = as_conv(folded[0], model[0])
    assert isinstance(folded[1], nn.Identity) and layer.bias is not None
    assert_exact_in_float64(model, x)
    ref = reference64(model, x)
    with torch.no_grad():
        err_folded = (folded(x).double() - ref).abs().max()
        err_plain = (model(x).double() - ref).abs().max()
    # Folded float32 is as accurate as the unfolded float32 model, up to the folded conv's own rounding.
    assert err_folded <= 1.5 * err_plain + rounding_budget(layer, x)


def as_conv(layer: nn.Module, original: nn.Module) -> nn.Module:
    """The folded conv; a depthwise 1×1 conv that became a DepthwiseAffine (#19) as that conv again."""
    if not isinstance(layer, DepthwiseAffine):
        return layer
    conv = copy.deepcopy(original)
    assert conv.groups == conv.in_channels == conv.out_channels and set(conv.kernel_size) == {1}
    with torch.no_grad():
        conv.weight.copy_(layer.scale.view_as(conv.weight))
        conv.bias = nn.Parameter(layer.shift.clone())
    return conv


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
    "subclass": {FOLDED: 3}, "nobn": {}, "acnet": {FOLDED: 10}, "dbb": {FOLDED: 10, AFFINE: 5},
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
    folded, report = fold(model, zoo.example_input("subclass"))
    assert isinstance(folded.bn1, FoldedNormAct) and isinstance(folded.bn1.act, nn.SiLU)
    assert {d.name: d.replaced_by for d in report.decisions}["bn1"] == "FoldedNormAct"
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
        # The plan says why; fold itself refuses the checkpoint before any work (the input is broken).
        decision = {d.name: d for d in plan_fold(model, zoo.example_input("resnet")).decisions}["layer1.bn1"]
        assert decision.action == REFUSED and "NaN" in decision.reason
        with pytest.raises(InputError, match="'layer1.bn1'.*recalibrate"):
            fold(model, zoo.example_input("resnet"), check=False)
        return
    else:
        skip = ("layer1.*",)
    folded, report = fold(model, zoo.example_input("resnet"), skip=skip)
    decision = {d.name: d for d in report.decisions}["layer1.bn1"]
    assert decision.action == REFUSED, decision
    assert isinstance(folded.layer1.bn1, nn.BatchNorm2d)
    assert report.batch_norm_ops_after >= 1


def broken_fold(monkeypatch):
    """Simulate a wrong fold (a 1% scale error) to test the safety net."""
    from bntool.folding import surgery

    real = surgery.fold_weights_producer
    monkeypatch.setattr(surgery, "fold_weights_producer", lambda layer, s, t: real(layer, s * 1.01, t))


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
                           "-o", out), contains="forward on the example inputs failed")
    assert_clean_error(cli("fold", resnet_sd, "--arch", "bntool.zoo:resnet", "--input-shape", "2,a", "-o", out),
                       contains="comma-separated")
    assert not out.exists()


# ---------------------------------------------------------------- planning apart from surgery


def test_plan_fold_decides_without_changing_the_model():
    model = zoo.build("preact").train()
    model.bn_fwd.eval()
    before = copy.deepcopy(model.state_dict())
    classes = [type(m) for m in model.modules()]
    plan = plan_fold(model, zoo.example_input("preact"))
    assert model.training and not model.bn_fwd.training and model.bn_pre.training  # modes put back
    assert [type(m) for m in model.modules()] == classes
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())
    by_name = {s.decision.name: s for s in plan.steps}
    assert by_name["bn_pre"].decision.action == FOLDED and by_name["bn_pre"].targets[0].layer == "conv0"
    assert by_name["bn_pad"].decision.action == AFFINE and "zero-pads" in by_name["bn_pad"].decision.reason
    assert plan.batch_norm_ops == 4 and plan.params == sum(p.numel() for p in model.parameters())
    # fold applies exactly the plan it is given: here one that leaves bn_pre alone.
    by_name["bn_pre"].decision.action, by_name["bn_pre"].targets = REFUSED, []
    by_name["bn_pre"].decision.reason = "kept by hand"
    folded, report = fold(model.eval(), zoo.example_input("preact"), plan=plan)
    assert isinstance(folded.bn_pre, nn.BatchNorm2d) and report.batch_norm_ops_after == 1
    assert report.ops_left == ["bn_pre: kept by hand"]


def test_inspect_plans_without_folding(monkeypatch):
    from bntool.folding import surgery
    from bntool.inspection import inspect

    monkeypatch.setattr(surgery, "apply_plan", lambda *a, **k: pytest.fail("inspect must not fold"))
    report = inspect(zoo.build("reused"), zoo.example_input("reused"))
    actions = {layer.name: (layer.fold_action, layer.fold_target) for layer in report.layers}
    assert actions["bn_a"] == (AFFINE, None) and actions["stem.1"] == (FOLDED, "stem.0")


# ---------------------------------------------------------------- odd readers


class BareWeightReuse(nn.Module):
    """The conv's weight is also used by a bare F.conv2d: folding into the conv would change that call too."""

    def __init__(self):
        super().__init__()
        self.conv, self.bn = nn.Conv2d(3, 4, 3, padding=1), nn.BatchNorm2d(4)

    def forward(self, x):
        return self.bn(self.conv(x)) + nn.functional.conv2d(x, self.conv.weight, None, padding=1)


class ReadsBNAttributes(nn.Module):
    """The forward reads a BN's γ and another's num_features outside their own calls."""

    def __init__(self):
        super().__init__()
        self.conv, self.bn = nn.Conv2d(3, 4, 3, padding=1), nn.BatchNorm2d(4)
        self.conv2, self.bn2 = nn.Conv2d(4, 4, 1), nn.BatchNorm2d(4)
        self.conv3, self.bn3 = nn.Conv2d(4, 4, 1), nn.BatchNorm2d(4)

    def forward(self, x):
        y = self.bn(self.conv(x)) * self.bn.weight.abs().view(1, -1, 1, 1)
        z = self.bn2(self.conv2(y))[:, : self.bn2.num_features]
        return self.bn3(self.conv3(z))


class ScriptedPart(nn.Module):
    def __init__(self):
        super().__init__()
        self.enc = torch.jit.script(nn.Sequential(nn.Conv2d(3, 4, 3), nn.BatchNorm2d(4), nn.ReLU()))
        self.conv, self.bn = nn.Conv2d(4, 4, 3), nn.BatchNorm2d(4)

    def forward(self, x):
        return self.bn(self.conv(self.enc(x)))


def fold_checked(model: nn.Module, x: torch.Tensor):
    """Fold; the folded output must match the float64 reference as closely as the unfolded model does."""
    folded, report = fold(model, x, samples=1)
    ref = reference64(model, x)
    with torch.no_grad():
        err_folded = (folded(x).double() - ref).abs().max()
        err_plain = (model(x).double() - ref).abs().max()
    assert report.passed and err_folded <= 1.5 * err_plain + ULPS * ref.abs().max()
    return folded, report, {d.name: d for d in report.decisions}


def test_weight_read_by_a_bare_call_is_not_folded_into():
    _, _, d = fold_checked(zoo.randomize_bn(BareWeightReuse()).eval(), torch.randn(2, 3, 8, 8))
    assert d["bn"].action == AFFINE and "weight is also read by conv2d" in d["bn"].reason


def test_bn_attributes_read_outside_the_bn_are_kept():
    folded, report, d = fold_checked(zoo.randomize_bn(ReadsBNAttributes()).eval(), torch.randn(2, 3, 8, 8))
    assert d["bn"].action == REFUSED and "weight is read outside its own forward" in d["bn"].reason
    assert d["bn2"].action == REFUSED and "num_features is read" in d["bn2"].reason
    assert d["bn3"].action == FOLDED
    assert isinstance(folded.bn, nn.BatchNorm2d) and report.batch_norm_ops_after == 2
    assert [line.split(":")[0] for line in report.ops_left] == ["bn", "bn2"]


def test_torchscript_submodule_is_opaque():
    folded, report, d = fold_checked(zoo.randomize_bn(ScriptedPart()).eval(), torch.randn(2, 3, 8, 8))
    assert report.opaque == ["enc"] and d["enc.1"].action == REFUSED and "TorchScript" in d["enc.1"].reason
    assert d["bn"].action == FOLDED and isinstance(folded.bn, nn.Identity)
    assert report.batch_norm_ops_before == 2 and report.batch_norm_ops_after == 1


def test_torchscript_model_is_a_clean_input_error():
    from bntool.errors import InputError

    with pytest.raises(InputError, match="TorchScript"):
        fold(torch.jit.script(zoo.build("resnet")), zoo.example_input("resnet"))


# ---------------------------------------------------------------- across sums and concats


@st.composite
def merge_configs(draw):
    kind = draw(st.sampled_from(["add", "cat", "cat-of-add"]))
    n = draw(st.integers(2, 3))
    groups = [draw(st.sampled_from([1, 2])) for _ in range(n)]
    cout = draw(st.integers(1, 3)) * 2
    outs = [cout] * n if kind == "add" else [g * draw(st.integers(1, 3)) for g in groups]
    if kind == "cat-of-add":  # the first two terms are summed, then concatenated with the rest
        outs[0] = outs[1] = 2 * draw(st.integers(1, 2))
    return dict(kind=kind, groups=groups, outs=outs, cin=2 * draw(st.integers(1, 2)),
                k=[draw(st.sampled_from([1, 3])) for _ in range(n)], bias=[draw(st.booleans()) for _ in range(n)],
                dims=draw(st.sampled_from([1, 2])), affine=draw(st.booleans()), tiny_var=draw(st.booleans()),
                dropout=draw(st.booleans()), seed=draw(st.integers(0, 10_000)))


class Merge(nn.Module):
    """BN of a sum or a channel concat of convs (each read only by the add/cat), as in MixNet and Inception."""

    def __init__(self, c):
        super().__init__()
        conv = nn.Conv1d if c["dims"] == 1 else nn.Conv2d
        self.c = c
        self.convs = nn.ModuleList(conv(c["cin"], o, k, padding=k // 2, groups=g, bias=b)
                                   for o, k, g, b in zip(c["outs"], c["k"], c["groups"], c["bias"]))
        channels = {"add": c["outs"][0], "cat": sum(c["outs"]), "cat-of-add": sum(c["outs"][1:])}[c["kind"]]
        self.bn = (nn.BatchNorm1d if c["dims"] == 1 else nn.BatchNorm2d)(channels, affine=c["affine"])

    def forward(self, x):
        ys = [conv(x) for conv in self.convs]
        if self.c["dropout"]:
            ys[0] = nn.functional.dropout(ys[0], 0.5, training=False)
        if self.c["kind"] == "add":
            y = ys[0]
            for term in ys[1:]:
                y = y + term
        elif self.c["kind"] == "cat":
            y = torch.cat(ys, 1)
        else:
            y = torch.cat([ys[0] + ys[1], *ys[2:]], dim=1)
        return self.bn(y)


@settings(max_examples=20, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(merge_configs())
def test_fold_across_sums_and_concats_is_exact(c):
    torch.manual_seed(c["seed"])
    model = Merge(c).eval()
    random_stats(model.bn, torch.Generator().manual_seed(c["seed"]), c["tiny_var"])
    x = torch.randn(2, c["cin"], *[6] * c["dims"], generator=torch.Generator().manual_seed(c["seed"] + 1))
    folded, report = fold(model, x)
    d = report.decisions[0]
    assert (d.action, sorted(d.target.split(", "))) == (FOLDED, [f"convs.{i}" for i in range(len(c["outs"]))])
    assert report.batch_norm_ops_after == 0 and isinstance(folded.bn, nn.Identity)
    # A sum's shift goes into one bias: a bias is added only where no term had one.
    added = report.layout.bias_added
    if c["kind"] == "add":
        assert len(added) == (0 if any(c["bias"]) else 1)
    elif c["kind"] == "cat":
        assert added == sorted(f"convs.{i}" for i, b in enumerate(c["bias"]) if not b)
    assert_exact_in_float64(model, x)
    ref = reference64(model, x)
    with torch.no_grad():
        out = folded(x).double()
        err_folded, err_plain = (out - ref).abs().max(), (model(x).double() - ref).abs().max()
    # Each folded conv rounds on its own; the sum adds one rounding of its result.
    budget = sum(rounding_budget(as_conv(conv, original), x) for conv, original in zip(folded.convs, model.convs)) \
        + 2 * ULPS * float(ref.abs().max())
    assert err_folded <= 1.5 * err_plain + budget


class MergeTraps(nn.Module):
    """Sums and concats that must not fold: a residual identity term, a conv output also read elsewhere,
    DenseNet-style conv outputs concatenated twice, a sum that broadcasts."""

    def __init__(self):
        super().__init__()
        self.a, self.b, self.c, self.d, self.e, self.f, self.g, self.h = (nn.Conv2d(4, 4, 1) for _ in range(8))
        self.bn_res, self.bn_shared, self.bn_dense1, self.bn_dense2, self.bn_bcast = (
            nn.BatchNorm2d(c) for c in (4, 4, 8, 12, 4))

    def forward(self, x):
        r = self.bn_res(self.a(x) + x)  # an identity term
        s = self.b(r)
        y = self.bn_shared(s + self.c(r)) + s  # s is read again by the second add
        f, g = self.d(y), self.e(y)
        z = self.bn_dense1(torch.cat([f, g], 1))  # f and g are concatenated again below
        w = self.bn_dense2(torch.cat([f, g, self.f(y)], 1))
        v = self.bn_bcast(self.g(y) + self.h(y).mean((2, 3), keepdim=True))
        return z.sum(1, keepdim=True) + w.sum(1, keepdim=True) + v


def test_merges_that_must_not_fold_become_affines():
    _, _, d = fold_checked(zoo.randomize_bn(MergeTraps()).eval(), torch.randn(2, 4, 6, 6))
    assert d["bn_res"].action == AFFINE and "a term of the add feeding it is also read by conv2d" in d["bn_res"].reason
    assert d["bn_shared"].action == AFFINE and "also read by add" in d["bn_shared"].reason
    assert d["bn_dense1"].action == AFFINE and "also read by cat" in d["bn_dense1"].reason
    assert d["bn_dense2"].action == AFFINE and "also read by cat" in d["bn_dense2"].reason
    assert d["bn_bcast"].action == AFFINE and "fed by add, not a conv" in d["bn_bcast"].reason


class ShapeReaders(nn.Module):
    """LeViT-style: `.reshape_as(y)` reads the Linear's output only for its shape; `.size()`, `.dim()` too."""

    def __init__(self):
        super().__init__()
        self.fc, self.bn = nn.Linear(6, 8), nn.BatchNorm1d(8)
        self.fc2 = nn.Linear(8, 3)

    def forward(self, x):  # (B, L, 6)
        y = self.fc(x)
        assert y.dim() == 3 and y.size(-1) == y.shape[-1] == 8
        z = self.bn(y.flatten(0, 1)).reshape_as(y)
        return self.fc2(torch.relu(z) * torch.ones_like(y))


def test_reads_of_the_shape_do_not_share_an_output():
    _, _, d = fold_checked(zoo.randomize_bn(ShapeReaders()).eval(), torch.randn(2, 5, 6))
    assert (d["bn"].action, d["bn"].target) == (FOLDED, "fc")


# ---------------------------------------------------------------- BatchNorm without a BatchNorm module


class FunctionalNorm(nn.Module):
    """A custom norm layer around F.batch_norm with its own buffers and parameters (ported code)."""

    def __init__(self, c, eps=1e-3):
        super().__init__()
        self.eps = eps
        self.register_buffer("mean", torch.randn(c))
        self.register_buffer("var", torch.rand(c) + 0.5)
        self.w, self.b = nn.Parameter(torch.randn(c)), nn.Parameter(torch.randn(c))

    def forward(self, x):
        return nn.functional.batch_norm(x, self.mean, self.var, self.w, self.b, training=False, eps=self.eps)


class FunctionalNet(nn.Module):
    def __init__(self):
        super().__init__()
        self.conv1, self.norm1 = nn.Conv2d(3, 4, 3, padding=1), FunctionalNorm(4)
        self.conv2 = nn.Conv2d(4, 4, 1, bias=False)
        self.register_buffer("m2", torch.randn(4))
        self.register_buffer("v2", torch.rand(4) + 0.5)
        self.norm3 = FunctionalNorm(4)

    def forward(self, x):
        x = torch.relu(self.norm1(self.conv1(x)))
        x = torch.relu(nn.functional.batch_norm(self.conv2(x), self.m2, self.v2, None, None, False))
        x = self.norm3(x)  # fed by relu: cannot fold, stays
        return nn.functional.batch_norm(x, None, None, training=True)  # batch statistics: stays


def test_functional_batch_norm_on_module_tensors_folds():
    torch.manual_seed(0)
    model = FunctionalNet().eval()
    x = torch.randn(4, 3, 6, 6)
    folded, report, d = fold_checked(model, x)
    assert {n: (v.type, v.action, v.target) for n, v in d.items()} == {
        "norm1": ("F.batch_norm", FOLDED, "conv1"), "(model)": ("F.batch_norm", FOLDED, "conv2"),
        "norm3": ("F.batch_norm", REFUSED, None)}
    assert "fed by relu" in d["norm3"].reason
    # The calls stay in the owners' forwards, now with identity statistics: every one is named, with why.
    assert report.batch_norm_ops_after == report.batch_norm_ops_before == 4
    assert len(report.ops_left) == 4 and "training=True" in report.ops_left[-1]
    assert torch.equal(folded.norm1.mean, torch.zeros(4)) and torch.equal(folded.norm1.w, torch.ones(4))
    ones = torch.ones(1, 4, 1, 1)
    with torch.no_grad():  # exactly the identity, not merely close
        assert torch.equal(folded.norm1(ones * 3.7), ones * 3.7)
    assert report.layout.bias_added == ["conv2"]
    assert not torch.equal(model.norm1.mean, torch.zeros(4))  # the original keeps its statistics


def test_inspect_lists_functional_batch_norm():
    from bntool.inspection import inspect

    report = inspect(FunctionalNet().eval(), torch.randn(2, 3, 6, 6))
    assert [(layer.name, layer.type, layer.fold_action) for layer in report.layers] == [
        ("norm1", "F.batch_norm", FOLDED), ("(model)", "F.batch_norm", FOLDED), ("norm3", "F.batch_norm", REFUSED)]
    assert len(report.batch_norm_calls_unplanned) == 1


# ---------------------------------------------------------------- BN+activation classes


class TimmBatchNormAct2d(nn.BatchNorm2d):
    """A faithful replica of timm.layers.BatchNormAct2d (timm 1.0): its own copy of BatchNorm2d.forward's
    eval path through F.batch_norm, then drop, then act. Named like timm's class, as the fold recognizes it."""

    def __init__(self, num_features, eps=1e-5, apply_act=True, act_layer=nn.ReLU, drop_layer=None):
        super().__init__(num_features, eps=eps)
        self.drop = drop_layer() if drop_layer is not None else nn.Identity()
        self.act = act_layer(inplace=True) if apply_act else nn.Identity()

    def forward(self, x):
        assert x.ndim == 4, f"expected 4D input (got {x.ndim}D input)"
        bn_training = self.training or (self.running_mean is None and self.running_var is None)
        x = nn.functional.batch_norm(
            x, self.running_mean if not self.training or self.track_running_stats else None,
            self.running_var if not self.training or self.track_running_stats else None,
            self.weight, self.bias, bn_training, 0.0 if self.momentum is None else self.momentum, self.eps)
        x = self.drop(x)
        x = self.act(x)
        return x


TimmBatchNormAct2d.__name__ = TimmBatchNormAct2d.__qualname__ = "BatchNormAct2d"


class LookAlike(TimmBatchNormAct2d):
    """Named like timm's class, but activates before normalizing: must not be replaced structurally."""

    def forward(self, x):
        return super().forward(torch.relu(x))


LookAlike.__name__ = "BatchNormAct2d"


class GeluNorm(nn.BatchNorm2d):
    """A BN subclass nobody knows: its batch_norm call is intercepted, its GELU kept."""

    def forward(self, x):
        return nn.functional.gelu(super().forward(x))


class NormActNet(nn.Module):
    """EfficientNet-like: conv → BN+SiLU (+ dropout layer), depthwise conv → BN+SiLU, 1×1 → BN without act
    added to a residual, a BN+act fed by that add (an affine), a look-alike and an unknown subclass."""

    def __init__(self):
        super().__init__()
        self.stem, self.bn1 = nn.Conv2d(3, 8, 3, padding=1, bias=False), TimmBatchNormAct2d(
            8, act_layer=nn.SiLU, drop_layer=lambda: nn.Dropout(0.2))
        self.dw = nn.Conv2d(8, 8, 3, padding=1, groups=8, bias=False)
        self.bn2 = TimmBatchNormAct2d(8, act_layer=nn.SiLU)
        self.pw, self.bn3 = nn.Conv2d(8, 8, 1, bias=False), TimmBatchNormAct2d(8, apply_act=False)
        self.bn4 = TimmBatchNormAct2d(8, act_layer=nn.Hardswish)
        self.conv5, self.bn5 = nn.Conv2d(8, 8, 1), LookAlike(8)
        self.conv6, self.bn6 = nn.Conv2d(8, 8, 1), GeluNorm(8)

    def forward(self, x):
        x = self.bn1(self.stem(x))
        x = self.bn4(x + self.bn3(self.pw(self.bn2(self.dw(x)))))
        return self.bn6(self.conv6(self.bn5(self.conv5(x))))


def test_bn_act_classes_are_replaced_structurally():
    model = zoo.randomize_bn(NormActNet()).eval()
    folded, report, d = fold_checked(model, torch.randn(2, 3, 8, 8))
    paths = {name: (v.action, v.replaced_by) for name, v in d.items()}
    assert paths == {"bn1": (FOLDED, "FoldedNormAct"), "bn2": (FOLDED, "FoldedNormAct"),
                     "bn3": (FOLDED, "FoldedNormAct"), "bn4": (AFFINE, "FoldedNormAct"),
                     "bn5": (AFFINE, "intercepted forward"), "bn6": (FOLDED, "intercepted forward")}
    assert isinstance(folded.bn1.drop, nn.Dropout) and isinstance(folded.bn4.norm, ChannelAffine)
    assert report.layout.norm_act == ["bn1", "bn2", "bn3", "bn4"] and report.batch_norm_ops_after == 0


def test_folded_bn_act_models_script_trace_export_and_compile():
    model = nn.Sequential(nn.Conv2d(3, 8, 3, bias=False), TimmBatchNormAct2d(8, act_layer=nn.SiLU),
                          nn.Conv2d(8, 8, 1), TimmBatchNormAct2d(8, act_layer=nn.ReLU))
    model = zoo.randomize_bn(model).eval()
    x = torch.randn(2, 3, 8, 8)
    folded, _ = fold(model, x)
    with torch.no_grad():
        expected = folded(x)
        assert torch.equal(torch.jit.script(folded)(x), expected)
        assert torch.equal(torch.jit.trace(folded, (x,))(x), expected)
        assert torch.allclose(torch.export.export(folded, (x,)).module()(x), expected, rtol=1e-6, atol=1e-6)
        assert torch.allclose(torch.compile(folded, backend="aot_eager")(x), expected, rtol=1e-6, atol=1e-6)


@pytest.mark.parametrize("name", ["resnet", "preact", "tokens", "subclass", "mlp"])
def test_folded_zoo_models_script_and_trace(name):
    """Where the original scripts or traces, the folded model does too, with the same outputs."""
    model, x = zoo.build(name), zoo.example_input(name)
    folded, _ = fold(model, x)
    with torch.no_grad():
        expected = folded(x)
        for convert in (torch.jit.script, lambda m: torch.jit.trace(m, (x,), check_trace=False)):
            try:
                convert(copy.deepcopy(model))
            except Exception:
                continue
            assert torch.allclose(convert(folded)(x), expected, rtol=1e-5, atol=1e-6)


def test_real_timm_bn_act_is_replaced_structurally():
    try:
        import timm.layers as timm_layers
    except Exception as e:  # not installed, or torchvision's CUDA-built ops on a CPU torch
        pytest.skip(f"timm does not import here: {e}")
    model = nn.Sequential(nn.Conv2d(3, 8, 3, bias=False), timm_layers.BatchNormAct2d(8, act_layer=nn.SiLU))
    folded, report, d = fold_checked(zoo.randomize_bn(model).eval(), torch.randn(2, 3, 8, 8))
    assert d["1"].replaced_by == "FoldedNormAct" and isinstance(folded[1], FoldedNormAct)
    torch.jit.script(folded)
