"""Every example runs end to end (on CPU, in its --quick mode: full size is a benchmark) and shows what it claims."""

from __future__ import annotations

import os
import re
import subprocess
import sys

import pytest
import torch
from helpers import PYTHON, ROOT

EXAMPLES = ROOT / "examples"
try:
    import sklearn  # noqa: F401

    HAVE_SKLEARN = True
except ImportError:
    HAVE_SKLEARN = False
needs_sklearn = pytest.mark.skipif(not HAVE_SKLEARN, reason="the examples extra (scikit-learn) is not installed")


def run(*args, timeout=120) -> str:
    env = dict(os.environ, OMP_NUM_THREADS="2")
    out = subprocess.run([PYTHON, *map(str, args)], capture_output=True, text=True, timeout=timeout, env=env,
                         cwd=ROOT)
    assert out.returncode == 0, out.stderr[-3000:]
    return out.stdout


def percent(text: str, label: str) -> float:
    return float(re.search(re.escape(label) + r"\s*([\d.]+)%", text).group(1))


@needs_sklearn
def test_domain_shift_recovers_accuracy(tmp_path):
    out = run(EXAMPLES / "domain_shift.py", "--quick", "--plot", tmp_path / "shift.png")
    clean = percent(out, "accuracy on clean test images:")
    shifted = percent(out, "accuracy on shifted test images:")
    assert clean > 85 and shifted < clean - 15
    row64 = next(line for line in out.splitlines() if line.strip().startswith("64 |"))
    exact64 = float(row64.split("|")[3].strip().rstrip("%"))
    assert exact64 > shifted + 10  # recalibration brings most of it back
    row1 = next(line for line in out.splitlines() if line.strip().startswith("1 |"))
    assert "fails" in row1.split("|")[1]  # update_bn cannot run BatchNorm1d on single samples
    assert abs(float(row1.split("|")[3].strip().rstrip("%")) - exact64) < 1.0  # exact: batch-size independent
    assert (tmp_path / "shift.png").stat().st_size > 10_000
    assert "prior N=16" in out and "adapting from n images" in out  # the few-image table with and without a prior


@needs_sklearn
def test_weight_averaging_restores_accuracy():
    out = run(EXAMPLES / "weight_averaging.py", "--quick")
    stale = percent(out, "averaged weights, stale BN statistics:")
    fixed = percent(out, "averaged weights, recalibrated BN:")
    assert fixed > stale + 5 and fixed > 85


def test_deploy_folds_exports_and_verifies():
    out = run(EXAMPLES / "deploy.py", "--quick")
    assert "batch_norm ops" in out and "→ 0" in out
    assert "BatchNormalization nodes" in out and "→ 0 folded" in out
    assert "bn-health PASS, fold-equivalence PASS, onnx-equivalence PASS" in out


def test_bring_your_own_model():
    out = run(EXAMPLES / "byo_model" / "run.py")
    assert "folded checkpoint keeps your other keys: epoch=90" in out


@pytest.mark.slow
def test_ci_example_command_line(tmp_path, resnet_sd):
    """The workflow's verify invocation, on a real checkpoint and ONNX file."""
    onnx_path = tmp_path / "model.onnx"
    base = [sys.executable, "-m", "bntool"]
    subprocess.run([*base, "export-onnx", resnet_sd, "--arch", "bntool.zoo:resnet", "--input-shape", "1,3,32,32",
                    "--dynamic-batch", "-o", onnx_path, "--exporter", "legacy"], check=True, capture_output=True)
    result = subprocess.run([*base, "verify", resnet_sd, "--arch", "bntool.zoo:resnet", "--input-shape",
                             "1,3,32,32", "--onnx", onnx_path, "--json", "--junit-xml", tmp_path / "v.xml"],
                            capture_output=True, text=True)
    assert result.returncode == 0 and '"passed": true' in result.stdout
    workflow = (EXAMPLES / "ci" / "bntool-verify.yml").read_text()
    assert "bntool verify" in workflow and "--junit-xml" in workflow


def test_recalibrate_plot(tmp_path, cli, resnet_sd):
    pytest.importorskip("matplotlib")
    torch.save(torch.randn(16, 3, 32, 32), tmp_path / "x.pt")
    result = cli("recalibrate", resnet_sd, "--arch", "bntool.zoo:resnet", "--data", tmp_path / "x.pt", "-o",
                 tmp_path / "out.pt", "--plot", tmp_path / "shift.png", "--quiet")
    assert result.code == 0, result.err
    assert (tmp_path / "shift.png").read_bytes()[:4] == b"\x89PNG"
