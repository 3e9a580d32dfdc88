"""The whole workflow on a built-in model and synthetic data: inspect → recalibrate → fold → export-onnx → verify.

Nothing is downloaded: the model comes from bntool.zoo and the data is generated, with a shifted input
domain (brightness/contrast) so recalibration has something to fix.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from . import zoo
from .checkpoint import state_dict_of
from .files import atomic_write, check_output_path


@dataclass
class DemoReport:
    directory: str
    files: dict[str, str] = field(default_factory=dict)
    steps: list[dict[str, Any]] = field(default_factory=list)
    passed: bool = True

    def to_dict(self) -> dict[str, Any]:
        return {"directory": self.directory, "files": self.files, "steps": self.steps, "passed": self.passed}


def shifted_images(n: int, seed: int = 0) -> torch.Tensor:
    """Smooth random 32×32 images, then a domain shift: brighter, lower contrast, noisy."""
    g = torch.Generator().manual_seed(seed)
    base = torch.nn.functional.interpolate(torch.randn(n, 3, 8, 8, generator=g), size=32, mode="bilinear")
    return 0.6 * base + 0.8 + 0.1 * torch.randn(n, 3, 32, 32, generator=g)


def run_demo(directory: str | Path, force: bool = False, exporter: str = "auto") -> DemoReport:
    from .folding import fold
    from .inspection import inspect
    from .onnx_export import export_onnx
    from .recalibration import recalibrate
    from .verification import verify

    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    paths = {name: directory / name for name in ("model.pt", "calibration.pt", "recalibrated.pt", "folded.pt",
                                                  "model.onnx")}
    for p in paths.values():
        check_output_path(p, force=force)
    report = DemoReport(directory=str(directory), files={k: str(v) for k, v in paths.items()})
    model = zoo.build("resnet")
    data = shifted_images(256)
    atomic_write(paths["model.pt"], lambda tmp: torch.save(model.state_dict(), tmp))
    atomic_write(paths["calibration.pt"], lambda tmp: torch.save(data, tmp))
    example = data[:4]

    before = inspect(model, example)
    report.steps.append({"step": "inspect", "bn_layers": len(before.layers),
                         "fold_plan": {a: sum(layer.fold_action == a for layer in before.layers)
                                       for a in ("folded", "folded-forward", "affine", "refused")}})
    rec = recalibrate(model, list(data.split(32)), mode="exact")
    atomic_write(paths["recalibrated.pt"], lambda tmp: torch.save(model.state_dict(), tmp))
    report.steps.append({"step": "recalibrate", "mode": rec.mode, "samples": rec.samples, "passes": rec.passes,
                         "max_mean_shift_sigma": max(layer.mean_shift for layer in rec.layers)})
    folded, fold_report = fold(model, example, samples=4)
    atomic_write(paths["folded.pt"], lambda tmp: torch.save(state_dict_of(folded), tmp))
    report.steps.append({"step": "fold", "batch_norm_ops": [fold_report.batch_norm_ops_before,
                                                            fold_report.batch_norm_ops_after],
                         "max_abs_over_scale": fold_report.max_abs_over_scale, "passed": fold_report.passed})
    exp = export_onnx(model, example, paths["model.onnx"], dynamic_batch=True, exporter=exporter, force=force,
                      samples=2)
    report.steps.append({"step": "export-onnx", "exporter": exp.exporter, "batch_norm_nodes": exp.batch_norm_nodes,
                         "max_abs_over_scale": exp.max_abs_over_scale, "passed": exp.passed})
    ver = verify(model, example, onnx_path=paths["model.onnx"], samples=2)
    report.steps.append({"step": "verify", "passed": ver.passed, "checks": {c.name: c.passed for c in ver.checks}})
    report.passed = fold_report.passed and exp.passed and ver.passed
    return report
