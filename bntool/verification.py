"""The non-interactive checks a CI pipeline runs on a PyTorch model: BN health, fold equivalence, ONNX equivalence.

Each check passes or fails with figures; `VerifyReport.passed` only when all pass. JSON and JUnit XML
(`to_junit_xml`) are the machine-readable forms. An ONNX file's checks, and what both share (`Check`,
`VerifyReport`, JUnit XML, Markdown), are in verification_onnx.py, which imports no torch module.
"""

from __future__ import annotations

import os
import tempfile
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import nn

from .compare import RecordedRuns
from .devices import check_not_meta, modes_kept, moved_to, to_device
from .errors import BrokenStatistics, CheckFailed
from .utils import plural
from .verification_onnx import (
    Check,
    VerifyReport,
    figures_text,
    fold_check,
    health_check,
    junit_error_xml,
    markdown_error,
    noted,
    timed,
    to_junit_xml,
    to_markdown,
    verify_onnx,
)

__all__ = ["Check", "VerifyReport", "check_fold", "check_health", "check_onnx", "figures_text", "fold_check",
           "health_check", "junit_error_xml", "markdown_error", "to_junit_xml", "to_markdown", "verify",
           "verify_onnx"]


def verify(
    model: nn.Module,
    example_inputs: Sequence[torch.Tensor] | torch.Tensor,
    *,
    onnx_path: str | os.PathLike | None = None,
    onnx: bool = True,
    exporter: str = "auto",
    samples: int = 4,
    seed: int = 0,
    rtol: float | None = None,
    atol: float | None = None,
    onnx_rtol: float | None = None,
    onnx_atol: float | None = None,
    data: Iterable[torch.Tensor] | None = None,
    device: str | torch.device | None = None,
) -> VerifyReport:
    """Run the CI checks: BN health, folded vs original, and (with `onnx`) onnxruntime vs PyTorch.

    Args:
        model: the model to check; it is not modified (fold works on a copy).
        example_inputs: one input tensor or a sequence of them.
        onnx_path: an ONNX file to check; without it the model is exported to a temp directory.
        onnx: run the ONNX check at all.
        exporter: "auto", "dynamo" or "legacy" (see `export_onnx`).
        samples, seed: random inputs of the example's shapes, besides the example.
        rtol, atol: the fold check's tolerance (see bntool.compare.Tolerance; default by dtype).
        onnx_rtol, onnx_atol: the ONNX check's tolerance (default 1e-4 and 1e-4 of each output's magnitude).
        data: real input batches checked besides the random ones (ONNX check).
        device: where PyTorch runs the checks ("cpu", "cuda", "cuda:1", "mps"); inputs and data are moved there
            and the model is put back afterwards. Default: where the model is.

    Returns:
        A VerifyReport; `passed` only if every check passed. A check that fails does not raise.
        `model` is not changed: its training flags and placement are put back.

    Raises:
        InputError: the model does not accept the inputs, or `onnx_path` is not a loadable ONNX file.
    """
    check_not_meta(model)
    from .compare import check_samples

    inputs = (example_inputs,) if isinstance(example_inputs, torch.Tensor) else tuple(example_inputs)
    check_samples(samples)
    report = VerifyReport()
    with moved_to(model, device) as dev, modes_kept(model):
        inputs = to_device(inputs, dev) if device is not None else inputs
        report.checks.append(timed(lambda: check_health(model)))
        folding = _Folding()
        report.checks.append(timed(lambda: check_fold(model, inputs, samples, seed, rtol, atol, folding)))
        if onnx:
            data = list(data) if data is not None else None
            report.checks.append(timed(lambda: check_onnx(model, inputs, onnx_path, exporter, samples, seed,
                                                           onnx_rtol, onnx_atol, data, folding)))
    return report


@dataclass
class _Folding:
    """The fold check's result, reused by the ONNX check: verify plans and folds once."""

    result: tuple[nn.Module, Any] | None = None  # (folded, FoldReport) where the fold check passed
    not_run: str = ""  # why the model cannot be folded at all (broken statistics)
    # The model's outputs the fold check computed: the ONNX check compares with the same ones on the same inputs
    # (the example, and the random inputs at the example's batch size) instead of running the model again.
    runs: RecordedRuns = field(default_factory=RecordedRuns)


def check_health(model: nn.Module) -> Check:
    from .inspection import inspect

    return health_check(inspect(model))


def check_fold(model, inputs, samples, seed, rtol, atol, folding: _Folding | None = None) -> Check:
    from .folding import fold

    folding = folding or _Folding()
    try:
        folded, r = fold(model, inputs, samples=samples, seed=seed, rtol=rtol, atol=atol, check=False,
                         reference_runs=folding.runs)
    except BrokenStatistics as e:  # the checkpoint is at fault (bn-health says so); folding would compare NaNs
        broken = e.broken
        folding.not_run = (f"not run: {plural(len(broken), 'BN layer')} cannot be folded, e.g. {broken[0][0]}: "
                           f"{broken[0][1]}")
        return Check("fold-equivalence", False, folding.not_run)
    except CheckFailed as e:
        return Check("fold-equivalence", False, str(e))
    if r.passed:
        folding.result = (folded, r)
    return fold_check(r)


def check_onnx(model, inputs, onnx_path, exporter, samples, seed, rtol, atol, data,
               folding: _Folding | None = None) -> Check:
    from .compare import Tolerance
    from .onnx_check import compare_with_onnxruntime, load_checked, op_counts
    from .onnx_export import default_export_tolerance, export_onnx

    tolerance = Tolerance.resolve(rtol, atol, default_export_tolerance(model, inputs))
    folding = folding or _Folding()
    figures: dict[str, Any]
    if onnx_path is None and folding.not_run:
        return Check("onnx-equivalence", False, folding.not_run)
    report: Any  # an OnnxCheck or an ExportReport: both hold comparisons and notes
    if onnx_path is not None:
        graph = load_checked(onnx_path)
        try:
            report = compare_with_onnxruntime(model.eval(), onnx_path, inputs, tolerance, samples=samples, seed=seed,
                                              data=data, reference_runs=folding.runs)
        except CheckFailed as e:
            return Check("onnx-equivalence", False, str(e))
        figures = {"path": str(onnx_path), "exporter": None,
                   "batch_norm_nodes": op_counts(graph).get("BatchNormalization", 0)}
    else:
        with tempfile.TemporaryDirectory(prefix="bntool-verify-") as tmp:
            try:
                report = export_onnx(model, inputs, Path(tmp) / "model.onnx", exporter=exporter, samples=samples,
                                     seed=seed, data=data, rtol=rtol, atol=atol, dynamic_batch=True, check=False,
                                     folded=folding.result, reference_runs=folding.runs)
            except CheckFailed as e:
                return Check("onnx-equivalence", False, str(e))
        figures = {"path": None, "exporter": report.exporter, "batch_norm_nodes": report.batch_norm_nodes}
    figures.update(report.summary_figures(), tolerance=tolerance.to_dict(), comparisons=len(report.comparisons),
                   notes=report.notes)
    failing = [c for c in report.comparisons if not c.passed]
    summary = (f"onnxruntime vs PyTorch on {plural(len(report.comparisons), 'input/output pair')}: max abs "
               f"{report.max_abs:.3g} ({report.max_abs_over_scale:.2g} of the output's magnitude) against atol "
               f"{report.atol_at_worst:.3g} ({tolerance.describe()})")
    if failing:
        summary += f"; {len(failing)} over tolerance, first: {failing[0].input} {failing[0].output}"
    summary += noted(report)
    figures["notes"] = [*report.notes, *report.comparison_notes]
    return Check("onnx-equivalence", report.passed, summary, figures)
