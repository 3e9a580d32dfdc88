"""folding/math.py is written once for torch tensors (the PyTorch fold) and numpy arrays (the ONNX fold): both
give the same float64 numbers, and the PyTorch path's are the same torch operations as before."""

from __future__ import annotations

import subprocess
import sys

import numpy as np
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from bntool.folding import math as fm


def _bn(rng: np.random.Generator, c: int, dtype=np.float32):
    mean = rng.normal(0, 3, c).astype(dtype)
    var = rng.uniform(1e-3, 4, c).astype(dtype)
    return mean, var, rng.normal(1, 0.5, c).astype(dtype), rng.normal(0, 1, c).astype(dtype)


def _same(a, b) -> bool:
    """Bit for bit (signs of zero included); None only with None."""
    if a is None or b is None:
        return a is None and b is None
    a, b = a.numpy(), np.asarray(b)
    return a.dtype == b.dtype and a.shape == b.shape and a.tobytes() == b.tobytes()


def _torch_reference_scale_shift(mean, var, weight, bias, eps):
    """bn_scale_shift as the PyTorch path computed it before the math took numpy arrays too."""
    scale = torch.rsqrt(var.double() + eps) * weight.double()
    return scale, -mean.double() * scale + bias.double()


@settings(max_examples=25, deadline=None)
@given(seed=st.integers(0, 2**31 - 1), c=st.integers(1, 12), groups=st.sampled_from([1, 2]),
       k=st.integers(1, 3), transposed=st.booleans(), with_bias=st.booleans(), half_shift=st.booleans())
def test_numpy_and_torch_fold_bit_identically(seed, c, groups, k, transposed, with_bias, half_shift):
    rng = np.random.default_rng(seed)
    c = c * groups
    mean, var, weight, bias = _bn(rng, c)
    eps = 1e-5
    s_np, t_np = fm.bn_scale_shift(mean, var, weight, bias, eps)
    s_t, t_t = fm.bn_scale_shift(*map(torch.from_numpy, (mean, var, weight, bias)), eps)
    assert _same(s_t, s_np) and _same(t_t, t_np)
    ref_s, ref_t = _torch_reference_scale_shift(*map(torch.from_numpy, (mean, var, weight, bias)), eps)
    assert _same(s_t, ref_s.numpy()) and _same(t_t, ref_t.numpy())
    assert fm.mean_in_stds(mean, var, eps) == fm.mean_in_stds(torch.from_numpy(mean), torch.from_numpy(var), eps)

    channels = list(rng.permutation(c))
    takes = [bool(x) for x in rng.integers(0, 2, c)] if half_shift else [True] * c
    sel_np = fm.select_channels(s_np, t_np, channels, takes)
    sel_t = fm.select_channels(s_t, t_t, channels, takes)
    assert all(_same(a, b) for a, b in zip(sel_t, sel_np))

    per_group = int(rng.integers(1, 4))
    shape = (per_group * groups, c // groups, k, k) if transposed else (c, per_group, k, k)
    w = rng.normal(0, 1, shape).astype(np.float32)
    b = rng.normal(0, 1, c).astype(np.float32) if with_bias else None
    prod_np = fm.fold_into_producer(w, b, *sel_np, groups=groups, transposed=transposed)
    prod_t = fm.fold_into_producer(torch.from_numpy(w), None if b is None else torch.from_numpy(b), *sel_t,
                                   groups=groups, transposed=transposed)
    assert all(_same(a, b) for a, b in zip(prod_t, prod_np))

    # Consumer: the weights are elementwise (bit-identical); the bias is a sum, added in each library's order.
    wc = rng.normal(0, 1, (per_group * groups, c // groups, k, k)).astype(np.float32)
    bc = rng.normal(0, 1, wc.shape[0]).astype(np.float32) if with_bias else None
    cons_np = fm.fold_into_consumer(wc, bc, s_np, t_np, groups=groups)
    cons_t = fm.fold_into_consumer(torch.from_numpy(wc), None if bc is None else torch.from_numpy(bc), s_t, t_t,
                                   groups=groups)
    assert _same(cons_t[0], cons_np[0])
    np.testing.assert_allclose(cons_t[1].numpy(), cons_np[1], rtol=1e-13, atol=1e-13)
    centered_np = fm.affine_with_center(s_np, t_np, mean)
    centered_t = fm.affine_with_center(s_t, t_t, torch.from_numpy(mean))
    assert all(_same(a, b) for a, b in zip(centered_t, centered_np))


def test_statistics_problem_reads_numpy_and_torch_alike():
    mean, var, weight, bias = _bn(np.random.default_rng(0), 4)
    for broken_var, why in ((np.array([1, np.nan, 1, 1], np.float32), "NaN/Inf"),
                            (np.array([1, -1, 1, 1], np.float32), "running_var + eps <= 0"), (var, "")):
        as_np = fm.statistics_problem(mean, broken_var, weight, bias, 1e-5)
        as_torch = fm.statistics_problem(*map(torch.from_numpy, (mean, broken_var, weight, bias)), 1e-5)
        assert as_np == as_torch and (why in as_np if why else as_np == "")


def test_the_math_imports_no_torch():
    """The ONNX path computes the fold without importing torch (its import is most of a small fold's time)."""
    code = ("import sys, importlib.util, numpy as np\n"
            "spec = importlib.util.spec_from_file_location('m', sys.argv[1])\n"
            "m = sys.modules['m'] = importlib.util.module_from_spec(spec)\n"
            "spec.loader.exec_module(m)\n"
            "s, t = m.bn_scale_shift(np.ones(3), np.ones(3), None, None, 0.0)\n"
            "m.fold_into_producer(np.ones((3, 2)), None, s, t); m.fold_into_consumer(np.ones((2, 3)), None, s, t)\n"
            "m.select_channels(s, t, [0, 1, 2], [True, False, True]); m.statistics_problem(s, s, s, t, 0.0)\n"
            "print('torch' in sys.modules)")
    out = subprocess.run([sys.executable, "-c", code, fm.__file__], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "False"
