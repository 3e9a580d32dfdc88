"""Fold on inputs that need care (#21 §3, §4): near-zero γ (no subnormal weights out), broken statistics (the
user's checkpoint at fault: exit 2 before any work), a torch.compile'd model (fold what it wraps)."""

from __future__ import annotations

import json

import pytest
import torch
from helpers import assert_clean_error
from torch import nn

from bntool.errors import InputError
from bntool.folding import fold
from bntool.folding.math import cast_flushing_subnormals, fold_value_range, is_subnormal

TINY = torch.finfo(torch.float32).tiny


def pruned_model(channels: int = 8) -> nn.Sequential:
    """conv-BN-ReLU-conv-BN with half of each BN's γ at 1e-39 (channels pruned by L1 sparsity), as in #21 §3."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(channels, channels, 3), nn.BatchNorm2d(channels), nn.ReLU(),
                          nn.Conv2d(channels, channels, 3), nn.BatchNorm2d(channels))
    with torch.no_grad():
        for bn in (model[1], model[4]):
            bn.running_mean.normal_()
            bn.running_var.uniform_(0.5, 2.0)
            bn.weight.uniform_(0.5, 1.5)
            bn.weight[: channels // 2] = 1e-39
            bn.bias.normal_()
    return model.eval()


def subnormals_a_plain_fold_writes(model: nn.Sequential) -> int:
    """Counted by hand in float64: W·s and b·s + t of each conv, cast to float32, nonzero below the smallest normal."""
    count = 0
    for conv, bn in ((model[0], model[1]), (model[3], model[4])):
        scale = bn.weight.double() / (bn.running_var.double() + bn.eps).sqrt()
        weight = (conv.weight.double() * scale.view(-1, 1, 1, 1)).float()
        bias = ((conv.bias.double() - bn.running_mean.double()) * scale + bn.bias.double()).float()
        count += sum(int(((t != 0) & (t.abs() < TINY)).sum()) for t in (weight, bias))
    return count


def test_fold_writes_no_subnormal_weights_and_counts_them():
    model = pruned_model()
    x = torch.randn(2, 8, 9, 9)
    expected = subnormals_a_plain_fold_writes(model)
    assert expected > 0  # the model is what the issue describes
    folded, report = fold(model, x, samples=2)
    values = torch.cat([p.detach().flatten() for p in folded.parameters()])
    assert int(is_subnormal(values).sum()) == 0
    assert report.subnormals_flushed == expected and report.to_dict()["subnormals_flushed"] == expected
    with torch.no_grad():
        reference = model.double()(x.double())
        assert (folded(x).double() - reference).abs().max() <= 1e-5 * reference.abs().max()


def test_fold_cli_says_how_many_subnormals_it_flushed(tmp_path, cli):
    src, out = tmp_path / "pruned.pt", tmp_path / "folded.pt"
    torch.save(pruned_model(), src)
    result = cli("fold", src, "--trust-pickle", "--input-shape", "2,8,9,9", "-o", out)
    assert result.code == 0, result.err
    count = subnormals_a_plain_fold_writes(pruned_model())
    assert f"Subnormal values flushed to zero: {count}" in " ".join(result.out.split())
    result = cli("fold", src, "--trust-pickle", "--input-shape", "2,8,9,9", "-o", out, "--force", "--json")
    assert json.loads(result.out)["subnormals_flushed"] == count


def test_flush_leaves_subnormals_that_were_there_before():
    before = torch.tensor([1e-39, 1.0, 2.0, 0.0])
    value = torch.tensor([1e-39, 1e-40, 3.0, 0.0], dtype=torch.float64)
    cast, count = cast_flushing_subnormals(value, torch.float32, before)
    assert count == 1 and cast.tolist() == [pytest.approx(1e-39), 0.0, 3.0, 0.0]
    half, count = cast_flushing_subnormals(torch.tensor([1e-5, 1e-3], dtype=torch.float64), torch.float16)
    assert count == 1 and half[0] == 0 and half[1] != 0  # float16's smallest normal is 6.1e-5


def test_fold_value_range_predicts_subnormals_and_overflow():
    scale, shift = torch.tensor([1e-39, 2.0], dtype=torch.float64), torch.tensor([0.0, 1.0], dtype=torch.float64)
    r = fold_value_range(scale, shift)
    assert r.subnormal_in(torch.float32) and not r.overflows(torch.float16)
    weight = torch.full((2, 3), 5e4)
    r = fold_value_range(torch.tensor([1.0, 2.0]), None, weight)
    assert r.overflows(torch.float16) and not r.overflows(torch.bfloat16) and not r.subnormal_in(torch.float32)
    assert r.largest == 1e5 and r.smallest == 5e4


@pytest.mark.parametrize("field, value", [("running_var", -1.0), ("running_var", float("nan")),
                                          ("running_mean", float("nan")), ("weight", float("nan"))])
def test_broken_statistics_are_the_inputs_fault(field, value):
    model = pruned_model()
    with torch.no_grad():
        getattr(model[4], field)[2] = value
    with pytest.raises(InputError, match=r"BatchNorm '4'.*recalibrate.*skip"):
        fold(model, torch.randn(2, 8, 9, 9))
    _, report = fold(model, torch.randn(2, 8, 9, 9), skip=["4"])  # the way out it names
    assert report.passed


def test_fold_cli_broken_statistics_exit_2_naming_three_layers(tmp_path, cli):
    model = nn.Sequential(*[m for _ in range(5) for m in (nn.Conv2d(4, 4, 1), nn.BatchNorm2d(4))]).eval()
    with torch.no_grad():
        for bn in list(model)[1::2]:
            bn.running_var[0] = -1.0
        model[1].running_var[0] = float("nan")  # each layer is named with its own problem
    src, out = tmp_path / "broken.pt", tmp_path / "folded.pt"
    torch.save(model, src)
    result = cli("fold", src, "--trust-pickle", "--input-shape", "1,4,5,5", "-o", out)
    assert_clean_error(result, 2, contains="BatchNorm '1' (statistics or affine parameters contain NaN/Inf), "
                                           "'3' (running_var + eps <= 0), '5' (running_var + eps <= 0) and 2 more "
                                           "(5 in all)")
    assert "bntool recalibrate" in result.err and "--skip" in result.err and not out.exists()


def test_compiled_model_folds_what_it_wraps():
    model = pruned_model()
    compiled = torch.compile(model)
    x = torch.randn(2, 8, 9, 9)
    folded, report = fold(compiled, x)
    assert report.passed and report.counts["folded"] == 2
    assert not isinstance(folded[1], nn.BatchNorm2d) and isinstance(model[1], nn.BatchNorm2d)
    assert any("torch.compile" in note for note in report.notes)


def test_verify_plans_and_folds_once(monkeypatch):
    """The fold check's folded model is the one the ONNX check exports: one plan trace, one check trace."""
    from bntool.folding import check, surgery, torch_plan
    from bntool.verification import verify

    calls = {"trace": 0, "apply": 0}

    def counting(real, key):
        def run(*args, **kwargs):
            calls[key] += 1
            return real(*args, **kwargs)
        return run

    monkeypatch.setattr(torch_plan, "trace", counting(torch_plan.trace, "trace"))
    monkeypatch.setattr(check, "trace", counting(check.trace, "trace"))
    monkeypatch.setattr(surgery, "apply_plan", counting(surgery.apply_plan, "apply"))
    import bntool.folding.api as api
    monkeypatch.setattr(api, "apply_plan", surgery.apply_plan)
    report = verify(pruned_model(), torch.randn(1, 8, 9, 9), samples=0, exporter="legacy")
    assert report.passed, report.to_dict()
    assert calls == {"trace": 2, "apply": 1}


class _FunctionalNorm(nn.Module):
    """Ported code: a conv, then F.batch_norm on buffers of its own (no BN module to scan)."""

    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(3, 4, 3)
        self.register_buffer("mean", torch.zeros(4))
        self.register_buffer("var", torch.ones(4))
        self.register_buffer("batch_mean", torch.full((4,), float("nan")))  # unused by a training=True call
        self.register_buffer("batch_var", torch.full((4,), float("nan")))

    def forward(self, x):
        x = nn.functional.batch_norm(self.conv(x), self.mean, self.var, training=False)
        return nn.functional.batch_norm(x, self.batch_mean, self.batch_var, training=True, momentum=0.0)


@pytest.mark.parametrize("field, value", [("var", float("nan")), ("var", -2.0), ("mean", float("inf"))])
def test_broken_statistics_of_a_functional_batch_norm_are_the_inputs_fault(field, value, tmp_path, cli):
    model = _FunctionalNorm().eval()
    x = torch.randn(2, 3, 8, 8)
    assert fold(model, x)[1].passed  # NaN statistics behind a training=True call are not read
    with torch.no_grad():
        getattr(model, field)[1] = value
    with pytest.raises(InputError, match=r"BatchNorm '\(model\)' \((statistics|running_var).*recalibrate.*skip"):
        fold(model, x)
    assert fold(model, x, skip=["(model)"])[1].passed  # the way out it names
    src, out = tmp_path / "functional.pt", tmp_path / "folded.pt"
    torch.save(model, src)
    result = cli("fold", src, "--trust-pickle", "--input-shape", "1,3,8,8", "-o", out)
    assert_clean_error(result, 2, contains="BatchNorm '(model)'")
    assert not out.exists()


def test_verify_fails_the_fold_check_of_a_functional_batch_norm_with_broken_statistics():
    from bntool.verification import verify

    model = _FunctionalNorm().eval()
    with torch.no_grad():
        model.var[0] = float("nan")
    report = verify(model, torch.randn(2, 3, 8, 8), onnx=False)
    fold_check = next(c for c in report.checks if c.name == "fold-equivalence")
    assert not report.passed and not fold_check.passed and "(model)" in fold_check.summary


def test_a_bn_left_in_training_mode_keeps_its_statistics():
    """A BN the user left in training mode inside an eval model is refused by fold, but every forward of the plan
    and the check updated its running statistics: the caller's model (and the folded copy) came back changed,
    num_batches_tracked 1000 → 1007 and the folded model 16% off once put in eval mode."""
    import copy

    from bntool import inspect, plan_fold, zoo

    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(3, 4, 3), nn.BatchNorm2d(4), nn.ReLU(), nn.Conv2d(4, 4, 3), nn.BatchNorm2d(4))
    model = zoo.randomize_bn(model).eval()
    model[4].num_batches_tracked.fill_(1000)
    model[4].train()  # left in training mode by the user
    before = copy.deepcopy(model.state_dict())
    x = torch.randn(2, 3, 10, 10)
    inspect(model, x)
    plan_fold(model, x)
    folded, report = fold(model, x)
    assert report.passed and model[4].training and not model[1].training
    for name, value in model.state_dict().items():
        assert torch.equal(value, before[name]), name
    refused = [m for m in folded.modules() if isinstance(m, nn.BatchNorm2d)]
    assert len(refused) == 1 and torch.equal(refused[0].running_mean, before["4.running_mean"])
    assert int(refused[0].num_batches_tracked) == 1000
