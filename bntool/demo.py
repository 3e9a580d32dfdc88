"""The whole workflow on a built-in model and synthetic data: inspect → recalibrate → fold → export-onnx → verify.

Nothing is downloaded: the model comes from bntool.zoo and the data is generated, with a shifted input
domain (brightness/contrast) so recalibration has something to fix.
"""

from __future__ import annotations

import contextlib
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from . import zoo
from .checkpoint import state_dict_of
from .errors import InputError, param
from .files import OutputKind, Outputs


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
    """Run the workflow and write its files into `directory`: model.pt, calibration.pt, recalibrated.pt,
    folded.pt, model.onnx. Everything is written into a temp directory first and moved into place at the end,
    only if every step ran and every check passed.

    Raises:
        InputError: `directory` is a file, or is not empty and `force` is not given, or a file cannot be written.
    """
    from .folding import fold
    from .inspection import inspect
    from .onnx_export import export_onnx
    from .recalibration import recalibrate
    from .verification import verify

    directory = Path(directory)
    if directory.exists() and not directory.is_dir():
        raise InputError(f"{directory}: is not a directory; give a directory for the demo's files")
    if directory.is_dir() and any(directory.iterdir()) and not force:
        raise InputError(f"{directory}: is not empty; pass {param('force')} to write the demo's files into it "
                         "(files of an earlier demo are replaced)", param="force")
    created = not directory.exists()
    if created and not directory.parent.is_dir():
        raise InputError(f"{directory}: parent directory {directory.parent} does not exist")
    try:
        directory.mkdir(exist_ok=True)
    except OSError as e:  # /proc, a read-only mount, a name too long: where the user asked for it
        raise InputError(f"{directory}: cannot create the demo's directory ({e.strerror or e})") from e
    try:
        return _run_demo(directory, force, exporter, fold, inspect, export_onnx, recalibrate, verify)
    except BaseException:
        if created:
            with contextlib.suppress(OSError):
                directory.rmdir()  # only if still empty: nothing of ours was committed
        raise


def _run_demo(directory: Path, force: bool, exporter: str, fold, inspect, export_onnx, recalibrate, verify):
    names = ("model.pt", "calibration.pt", "recalibrated.pt", "folded.pt", "model.onnx")
    outputs = Outputs()
    for name in names:
        # Each file is planned as what it holds: with --force, a second demo replaces the first one's checkpoints.
        kind = OutputKind.ONNX if name.endswith(".onnx") else OutputKind.CHECKPOINT
        outputs.add(directory / name, kind, force=force, what="demo file")
    outputs.check()
    report = DemoReport(directory=str(directory), files={name: str(directory / name) for name in names})
    with outputs:
        staging = outputs.staging_dir(directory / names[0])
        paths = {name: staging / name for name in names}
        model = zoo.build("resnet")
        data = shifted_images(256)
        torch.save(model.state_dict(), paths["model.pt"])
        torch.save(data, paths["calibration.pt"])
        example = data[:4]

        before = inspect(model, example)
        report.steps.append({"step": "inspect", "bn_layers": len(before.layers),
                             "fold_plan": {a: sum(layer.fold_action == a for layer in before.layers)
                                           for a in ("folded", "folded-forward", "affine", "refused")}})
        rec = recalibrate(model, list(data.split(32)), mode="exact")
        torch.save(model.state_dict(), paths["recalibrated.pt"])
        report.steps.append({"step": "recalibrate", "mode": rec.mode, "samples": rec.samples, "passes": rec.passes,
                             "max_mean_shift_sigma": max(layer.mean_shift for layer in rec.layers)})
        folded, fold_report = fold(model, example, samples=4)
        torch.save(state_dict_of(folded), paths["folded.pt"])
        report.steps.append({"step": "fold", "batch_norm_ops": [fold_report.batch_norm_ops_before,
                                                                fold_report.batch_norm_ops_after],
                             "max_abs_over_scale": fold_report.max_abs_over_scale, "passed": fold_report.passed})
        exp = export_onnx(model, example, paths["model.onnx"], dynamic_batch=True, exporter=exporter, samples=2,
                          check=False)
        report.steps.append({"step": "export-onnx", "exporter": exp.exporter,
                             "batch_norm_nodes": exp.batch_norm_nodes,
                             "max_abs_over_scale": exp.max_abs_over_scale, "passed": exp.passed})
        if exp.passed:
            ver = verify(model, example, onnx_path=paths["model.onnx"], samples=2)
            report.steps.append({"step": "verify", "passed": ver.passed,
                                 "checks": {c.name: c.passed for c in ver.checks}})
        report.passed = fold_report.passed and exp.passed and (ver.passed if exp.passed else False)
        if report.passed:  # a failed check leaves nothing behind
            for name in names:
                outputs.adopt(directory / name, paths[name], staging)
            outputs.commit()
    return report
