"""A folded checkpoint stays a checkpoint: any sequence of fold (with and without --skip), recalibrate, inspect,
verify and export-onnx over every checkpoint kind writes files that load with bntool.load_model and the CLI and
compute the same function as their input."""

from __future__ import annotations

import numpy as np
import torch
from hypothesis import HealthCheck, example, given, settings
from hypothesis import strategies as st

import bntool
from bntool import zoo
from bntool.checkpoint import load_checkpoint
from bntool.cli import main

ARCH = "bntool.zoo:resnet"
SHAPE = "2,3,32,32"
STEPS = ["fold", "fold-skip", "recalibrate", "inspect", "verify", "export-onnx"]
KINDS = ["state_dict", "wrapped", "safetensors", "module"]


def _write(kind: str, model: torch.nn.Module, directory) -> tuple:
    """The model saved as `kind`; returns (path, extra CLI args)."""
    if kind == "state_dict":
        path = directory / "m0.pt"
        torch.save(model.state_dict(), path)
    elif kind == "wrapped":
        path = directory / "m0.pt"
        torch.save({"model_state_dict": {"module." + k: v for k, v in model.state_dict().items()}, "epoch": 1}, path)
    elif kind == "safetensors":
        from safetensors.torch import save_file

        path = directory / "m0.safetensors"
        save_file({k: v.contiguous() for k, v in model.state_dict().items()}, str(path))
    else:
        path = directory / "m0.pt"
        torch.save(model, path)
        return path, ["--trust-pickle"]
    return path, ["--arch", ARCH]


def _load(path, extra) -> torch.nn.Module:
    arch = extra[1] if extra and extra[0] == "--arch" else None
    return bntool.load_model(path, arch=arch, trust_pickle="--trust-pickle" in extra)


def _cli(*args) -> int:
    return main([str(a) for a in args])


def _same_function(a: torch.nn.Module, b: torch.nn.Module, x: torch.Tensor) -> None:
    with torch.no_grad():
        ra, rb = a.eval()(x).double(), b.eval()(x).double()
    scale = float(ra.abs().max())
    assert float((ra - rb).abs().max()) <= 1e-4 * scale + 1e-6, float((ra - rb).abs().max())


@settings(max_examples=3, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture,
                                                                 HealthCheck.too_slow])
@example(kind="state_dict", steps=["fold", "fold"], in_place=True)  # fold of a folded file, in place
@example(kind="state_dict", steps=["fold-skip", "recalibrate", "fold"], in_place=False)  # partly folded
@example(kind="wrapped", steps=["fold-skip", "fold", "export-onnx"], in_place=True)
@example(kind="module", steps=["fold-skip", "recalibrate", "inspect"], in_place=False)
@given(kind=st.sampled_from(KINDS), steps=st.lists(st.sampled_from(STEPS), min_size=1, max_size=3),
       in_place=st.booleans())
def test_fold_layouts_compose(tmp_path_factory, kind, steps, in_place):
    directory = tmp_path_factory.mktemp("compose")
    np.save(directory / "x.npy", np.random.default_rng(0).standard_normal((8, 3, 32, 32)).astype(np.float32))
    x = torch.randn(2, 3, 32, 32, generator=torch.Generator().manual_seed(1))
    path, extra = _write(kind, zoo.build("resnet"), directory)
    current = latest = _load(path, extra)  # the function every output must compute; the latest file's model
    for i, step in enumerate(steps):
        out = path if in_place else directory / f"m{i + 1}{path.suffix}"
        place = ["--in-place"] if in_place else []
        if step in ("fold", "fold-skip"):
            skip = ["--skip", "layer1.*"] if step == "fold-skip" else []
            code = _cli("fold", path, *extra, "--input-shape", SHAPE, "--samples", "1", *skip, "-o", out, *place)
        elif step == "recalibrate":
            code = _cli("recalibrate", path, *extra, "--data", directory / "x.npy", "--workers", "0", "-q",
                        "-o", out, *place)
        elif step == "inspect":
            assert _cli("inspect", path, *extra, "--input-shape", SHAPE) == 0
            continue
        elif step == "verify":
            assert _cli("verify", path, *extra, "--input-shape", SHAPE, "--skip-onnx", "--samples", "1") == 0
            continue
        else:
            onnx_path = directory / f"m{i + 1}.onnx"
            assert _cli("export-onnx", path, *extra, "--input-shape", SHAPE, "--exporter", "legacy", "--samples",
                        "1", "-o", onnx_path) == 0
            import onnxruntime

            session = onnxruntime.InferenceSession(str(onnx_path), providers=["CPUExecutionProvider"])
            got = torch.from_numpy(session.run(None, {session.get_inputs()[0].name: x.numpy()})[0])
            _same_function(current, _Constant(got), x)
            continue
        bns = [n for n, m in latest.named_modules() if isinstance(m, torch.nn.modules.batchnorm._BatchNorm)]
        if step == "recalibrate" and not bns or step == "fold-skip" and not any(n.startswith("layer1.") for n in bns):
            assert code == 2 and (not out.exists() or out == path), (step, kind)  # refused, nothing written
            continue
        assert code == 0, (step, kind)
        loaded = _load(out, extra)
        if step == "recalibrate":  # new statistics: a new function, which every later step must keep
            current = loaded
        else:
            _same_function(current, loaded, x)
        assert load_checkpoint(out, arch=extra[1] if extra[0] == "--arch" else None,
                               trust_pickle=kind == "module").model is not None
        path, latest = out, loaded


class _Constant(torch.nn.Module):
    def __init__(self, value):
        super().__init__()
        self.value = value

    def forward(self, x):
        return self.value
