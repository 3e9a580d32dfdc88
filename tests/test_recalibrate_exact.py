"""Exact mode gives the statistics of whole eval-mode forwards whatever the model does: user hooks, a BN run twice
per forward, a block applied twice, `.data` writes, data-dependent branches, data that can be read only once.

Each result is compared with an independent float64 reference: whole eval-mode forwards of a float64 copy, every
BN's statistics pooled over all its calls and all batches, iterated until nothing changes (the fixed point that
exact mode promises), and with the same run without the activation cache.
"""

from __future__ import annotations

import copy
from collections import defaultdict

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from torch import nn
from torch.nn.modules.batchnorm import _BatchNorm

from bntool.errors import InputError
from bntool.recalibration import recalibrate


def bn_stats(model):
    bns = [m for m in model.modules() if isinstance(m, _BatchNorm)]
    return torch.cat([b.running_mean for b in bns]).double(), torch.cat([b.running_var for b in bns]).double()


def rel_diff(a, b):
    """|Δmean|/σ and |Δvar|/σ² with σ² = var + eps, what the BN divides by (a dead channel's 0 vs 0 is no NaN)."""
    (ma, va), (mb, vb) = a, b
    scale = vb + 1e-5
    return max(float(((ma - mb).abs() / scale.sqrt()).max()), float(((va - vb).abs() / scale).max()))


def fixed_point_reference(model, batches, iterations=200, dtype=torch.float64):
    """Float64 whole forwards; each BN's statistics over the inputs of all its calls in all batches; repeated
    until the statistics stop changing. `dtype=torch.float32`: the same in float32 arithmetic (statistics pooled
    in float64), run for all `iterations`: float32's own distance from the fixed point."""
    ref = copy.deepcopy(model).to(dtype).eval()
    bns = [m for m in ref.modules() if isinstance(m, _BatchNorm)]
    for _ in range(iterations):
        inputs = defaultdict(list)

        def keep(module, args, inputs=inputs):
            x = args[0]
            inputs[module].append(x.transpose(0, 1).reshape(x.shape[1], -1).double())

        handles = [m.register_forward_pre_hook(keep) for m in bns]
        with torch.no_grad():
            for x in batches:
                ref(x.to(dtype))
        for h in handles:
            h.remove()
        change = 0.0
        for m in bns:
            if inputs[m]:
                values = torch.cat(inputs[m], 1)
                mean, var = values.mean(1), values.var(1)
                change = max(change, float((mean - m.running_mean).abs().max()),
                             float((var - m.running_var).abs().max()))
                m.running_mean.copy_(mean)
                m.running_var.copy_(var)
        if change < 1e-11 or dtype != torch.float64 and _ == iterations - 1:
            return ref
    raise AssertionError("the reference did not converge")


def block(c_in, c_out, k=3):
    return nn.Sequential(nn.Conv2d(c_in, c_out, k, padding=k // 2), nn.BatchNorm2d(c_out), nn.ReLU())


class Composite(nn.Module):
    """A small CNN with any of the features that a replay of cached activations could get wrong."""

    def __init__(self, hook="", shared=False, twice=False, data_write=False, branch=False):
        super().__init__()
        self.stem = nn.Sequential(block(3, 4), block(4, 4, 1))
        if hook == "return":  # on a cached chain (its replay returns the cached output, and the hook runs after)
            self.stem.register_forward_hook(lambda m, args, out: out * 2 + 1)
        elif hook == "inplace":
            self.stem.register_forward_hook(lambda m, args, out: out.mul_(2).add_(1))
        elif hook == "pre":
            self.stem[1].register_forward_pre_hook(lambda m, args: (args[0] - 0.5,))
        self.block = block(4, 4)
        self.shared_bn, self.c1, self.c2 = nn.BatchNorm2d(4), nn.Conv2d(4, 4, 1), nn.Conv2d(4, 4, 3, padding=1)
        self.extra = nn.Sequential(nn.Conv2d(4, 4, 1), nn.BatchNorm2d(4))
        self.head = nn.Sequential(nn.Conv2d(4, 4, 1), nn.BatchNorm2d(4))
        self.shared, self.twice, self.data_write, self.branch = shared, twice, data_write, branch

    def forward(self, x):
        y = self.stem(x)
        y = self.block(self.block(y)) if self.twice else self.block(y)
        if self.data_write:
            y.data.mul_(1.5)  # behind the version counter, on what the cache keeps for `block`
        if self.shared:
            y = self.shared_bn(self.c1(y)) + self.shared_bn(self.c2(y))
        if self.branch and x.mean() > 0.5:  # only the later batches (the traced first one is below)
            y = self.extra(y)
        return self.head(y)


def randomized(model, seed):
    torch.manual_seed(seed)
    for m in model.modules():
        if isinstance(m, _BatchNorm):
            m.running_mean.uniform_(-1, 1)
            m.running_var.uniform_(0.5, 2)
            m.weight.data.uniform_(0.5, 1.5)
            m.bias.data.uniform_(-0.5, 0.5)
    if getattr(model, "twice", False):  # a small γ where the block feeds itself: converges in a few passes
        model.block[1].weight.data.uniform_(0.1, 0.3)
    return model.eval()


def calibration(seed=0, offsets=(0.0, 1.0, 1.2), size=6):
    g = torch.Generator().manual_seed(seed)
    return [torch.randn(4, 3, size, size, generator=g) + o for o in offsets]


def check_against_reference(model, data):
    """Cached and uncached exact runs both equal the float64 fixed point, or say that they did not reach it (a
    block applied twice whose statistics converge slowly); returns the cached run's report."""
    reference = bn_stats(fixed_point_reference(model, data))
    cached, uncached = copy.deepcopy(model), copy.deepcopy(model)
    report = recalibrate(cached, data, mode="exact")
    recalibrate(uncached, data, mode="exact", cache_budget=0)
    assert rel_diff(bn_stats(cached), bn_stats(uncached)) < 1e-5
    if "not converged" in getattr(report, "whole_passes", ""):
        assert rel_diff(bn_stats(cached), reference) > 1e-6  # said only when it is so
    else:
        error = rel_diff(bn_stats(cached), reference)
        if error >= 2e-5:  # a block applied to itself feeds float32 noise back: no further than float32's own run
            floor = rel_diff(bn_stats(fixed_point_reference(model, data, 100, torch.float32)), reference)
            assert error <= 1.5 * floor + 1e-6, (error, floor, report)
    return report


HOOKS = {
    "return": lambda stem: stem.register_forward_hook(lambda m, args, out: out * 2 + 1),
    "inplace": lambda stem: stem.register_forward_hook(lambda m, args, out: out.mul_(2).add_(1)),
    "pre": lambda stem: stem.register_forward_pre_hook(lambda m, args: (args[0] * 2 + 1,)),
}


@pytest.mark.parametrize("hook", list(HOOKS))
def test_a_users_hook_on_a_cached_module_is_run_as_a_whole_forward_runs_it(hook):
    from bntool import zoo

    model = zoo.build("resnet")
    HOOKS[hook](model.stem)  # a cached chain: its replay would return the cached output, then run the hook again
    data = [torch.randn(2, 3, 32, 32, generator=torch.Generator().manual_seed(i)) for i in range(2)]
    report = check_against_reference(model, data)
    assert getattr(report, "cache_bypassed", None) == ["stem: a forward hook"]
    assert not report.whole_passes  # the levels still hold: only the cache steps aside around the hook


def test_a_clean_model_keeps_the_level_passes_and_the_cache():
    report = check_against_reference(randomized(Composite(), 0), calibration())
    assert not report.whole_passes and not report.cache_bypassed and report.segment_replays > 0


def test_a_bn_called_twice_pools_both_calls():
    model = randomized(Composite(shared=True), 1)
    report = check_against_reference(model, calibration())
    assert "shared_bn (2 calls)" in report.whole_passes
    with torch.no_grad():  # by hand: the union of both calls' inputs, under the final statistics before it
        data = torch.cat(calibration())
        recalibrate(model, calibration(), mode="exact")
        y = model.block(model.stem(data))
        both = torch.cat([model.c1(y), model.c2(y)])
    assert torch.allclose(model.shared_bn.running_mean, both.mean((0, 2, 3)), atol=1e-5)
    assert torch.allclose(model.shared_bn.running_var, both.var((0, 2, 3)), rtol=1e-4)


def test_a_block_applied_twice_reaches_the_fixed_point():
    report = check_against_reference(randomized(Composite(twice=True), 2), calibration())
    assert "block.1 (2 calls)" in report.whole_passes and "not converged" not in report.whole_passes


class WritesThroughData(nn.Module):
    """Changes a chain's (cached) output through `.data` after one BN has read it: no version bump."""

    def __init__(self):
        super().__init__()
        self.features = nn.Sequential(nn.Conv2d(3, 4, 3), nn.BatchNorm2d(4), nn.ReLU())
        self.bn_a, self.bn_b, self.bn_c = nn.BatchNorm2d(4), nn.BatchNorm2d(4), nn.BatchNorm2d(4)
        self.conv, self.conv2 = nn.Conv2d(4, 4, 1), nn.Conv2d(4, 4, 1)

    def forward(self, x):
        y = self.features(x)
        a = self.bn_a(y)
        y.data.mul_(3)
        return self.bn_c(self.conv2(self.bn_b(self.conv(y + a))))


@pytest.mark.parametrize("model", [WritesThroughData, lambda: Composite(data_write=True)])
def test_an_output_changed_through_data_is_not_reused(model):
    report = check_against_reference(randomized(model(), 3), calibration())
    assert any(".data" in b for b in getattr(report, "cache_bypassed", []))


def test_a_bn_only_later_batches_reach_is_final_before_the_bns_after_it():
    report = check_against_reference(randomized(Composite(branch=True), 4), calibration())
    assert "data-dependent" in report.whole_passes


@settings(max_examples=4, deadline=None)
@given(hook=st.sampled_from(["", "return", "inplace", "pre"]), shared=st.booleans(), twice=st.booleans(),
       data_write=st.booleans(), branch=st.booleans(), seed=st.integers(0, 2**16))
def test_exact_mode_is_the_float64_fixed_point_cached_or_not(hook, shared, twice, data_write, branch, seed):
    model = randomized(Composite(hook, shared, twice, data_write, branch), seed)
    check_against_reference(model, calibration(seed, offsets=(0.0, 1.0, 1.3), size=5))


class Once:
    """Re-iterable in form (a new iterator each time) but backed by one generator, as a --loader that returns a
    generator is after wrapping: it yields its batches once."""

    def __init__(self, batches):
        self.source = iter(batches)

    def __iter__(self):
        yield from self.source


def test_data_that_can_be_read_only_once_is_refused_not_used_in_part():
    for model in (randomized(Composite(), 0), nn.Sequential(nn.Conv2d(3, 4, 1), nn.BatchNorm2d(4)).eval()):
        before = bn_stats(model)
        with pytest.raises(InputError, match="read only once|several times"):
            recalibrate(model, Once(calibration(offsets=(0, 0, 0, 0, 0, 0))), mode="exact")
        assert rel_diff(bn_stats(model), before) == 0
