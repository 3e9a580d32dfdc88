"""`verify` for an ONNX file (`verify_onnx`), and what both verifies share: `Check`, `VerifyReport`, the verdicts
of an inspect and a fold report, JUnit XML and Markdown. Imports no torch module: an ONNX file's verify, its
check and its errors import none (numpy draws the check's inputs; the health rules are numpy)."""

from __future__ import annotations

import os
import time
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any
from xml.etree import ElementTree as ET

from .errors import BrokenStatistics, CheckFailed, InputError, param
from .utils import plural


@dataclass
class Check:
    name: str
    passed: bool
    summary: str
    figures: dict[str, Any] = field(default_factory=dict)
    seconds: float = 0.0


@dataclass
class VerifyReport:
    checks: list[Check] = field(default_factory=list)

    @property
    def passed(self) -> bool:
        return all(c.passed for c in self.checks)

    def to_dict(self) -> dict[str, Any]:
        return {"passed": self.passed, "checks": [asdict(c) for c in self.checks]}


def timed(run) -> Check:
    """`run()`, a Check, with the seconds it took."""
    started = time.perf_counter()
    check = run()
    check.seconds = time.perf_counter() - started
    return check


def health_check(report) -> Check:
    """The bn-health check of an InspectReport (a PyTorch model's or an ONNX file's)."""
    # The verdict reads each flag's kind (HealthFlag.fatal), never its words.
    fatal = {layer.name: [f.message for f in layer.health if f.fatal] for layer in report.layers if layer.fatal}
    warned = {layer.name: layer.flags for layer in report.layers if layer.health and not layer.fatal}
    if fatal:
        first = next(iter(fatal))
        summary = f"{len(fatal)} of {plural(len(report.layers), 'BN layer')} unhealthy, e.g. {first}: {fatal[first][0]}"
    else:
        warned_first = next(iter(warned), "")
        summary = f"{plural(len(report.layers), 'BN layer')} healthy" + (
            f" ({len(warned)} with warnings, e.g. {warned_first}: {warned[warned_first][0]})" if warned else "")
    return Check("bn-health", not fatal, summary, {"layers": len(report.layers), "failed": fatal, "warnings": warned})


def fold_check(r) -> Check:
    """The fold-equivalence check of a FoldReport (a PyTorch model's or an ONNX file's)."""
    figures = {**r.summary_figures(), "tolerance": r.tolerance.to_dict(), "counts": r.to_dict()["counts"],
               "batch_norm_ops_after": r.batch_norm_ops_after, "inputs": len(r.comparisons)}
    summary = (f"folded vs original on {plural(len(r.comparisons), 'input')}: max abs {r.max_abs:.3g} "
               f"({r.max_abs_over_scale:.2g} of the output's magnitude) against atol {r.atol_at_worst:.3g} "
               f"({r.tolerance.describe()}); "
               f"{r.batch_norm_ops_before} → {r.batch_norm_ops_after} batch_norm ops" + noted(r))
    figures["notes"] = r.comparison_notes
    return Check("fold-equivalence", r.passed, summary, figures)


def noted(report) -> str:
    """A report's first note as the end of a check's summary ("" when it has none)."""
    return f"; {report.first_note}" if report.first_note else ""


def to_junit_xml(report: VerifyReport) -> str:
    """One testsuite, one testcase per check: what CI systems (GitHub, GitLab, Jenkins) display.
    A failure's body is the check's figures as readable 'name: value' lines."""
    suite = ET.Element("testsuite", name="bntool.verify", tests=str(len(report.checks)),
                       failures=str(sum(not c.passed for c in report.checks)), errors="0",
                       time=f"{sum(c.seconds for c in report.checks):.3f}")
    for check in report.checks:
        case = ET.SubElement(suite, "testcase", classname="bntool.verify", name=check.name, time=f"{check.seconds:.3f}")
        if not check.passed:
            failure = ET.SubElement(case, "failure", message=check.summary)
            failure.text = check.summary + "\n\n" + figures_text(check.figures)
        else:
            out = ET.SubElement(case, "system-out")
            out.text = check.summary
    return _xml(suite)


def junit_error_xml(message: str, name: str = "verify") -> str:
    """JUnit XML for a verify that could not run (bad input, missing file): one errored testcase with the
    message, so a CI dashboard shows why instead of a missing report."""
    suite = ET.Element("testsuite", name="bntool.verify", tests="1", failures="0", errors="1", time="0.000")
    case = ET.SubElement(suite, "testcase", classname="bntool.verify", name=name, time="0.000")
    error = ET.SubElement(case, "error", message=message)
    error.text = message
    return _xml(suite)


def _xml(suite: ET.Element) -> str:
    return ET.tostring(suite, encoding="unicode", xml_declaration=True) + "\n"


def figures_text(figures: dict[str, Any], indent: str = "") -> str:
    """Nested figures as 'name: value' lines, nested mappings indented under their name."""
    lines = []
    for key, value in figures.items():
        if isinstance(value, dict) and value:
            lines.append(f"{indent}{key}:")
            lines.append(figures_text(value, indent + "  "))
        elif isinstance(value, (list, tuple)):
            lines.append(f"{indent}{key}: {', '.join(_plain(v) for v in value) if value else '-'}")
        else:
            lines.append(f"{indent}{key}: {_plain(value)}")
    return "\n".join(lines)


def _plain(value: Any) -> str:
    if isinstance(value, float):
        return f"{value:.4g}"
    if isinstance(value, dict):
        return "-" if not value else ", ".join(f"{k} {_plain(v)}" for k, v in value.items())
    return "-" if value is None else str(value)


def to_markdown(report: VerifyReport, title: str = "bntool verify") -> str:
    """A Markdown table of the checks, for a CI job summary ($GITHUB_STEP_SUMMARY)."""
    verdict = "all checks passed" if report.passed else f"{sum(not c.passed for c in report.checks)} failed"
    lines = [f"### {title}: {verdict}", "", "| check | result | details | time |", "|---|---|---|---|"]
    for c in report.checks:
        result = "✅ pass" if c.passed else "❌ **FAIL**"
        lines.append(f"| {c.name} | {result} | {_md_cell(c.summary)} | {c.seconds:.1f} s |")
    return "\n".join(lines) + "\n"


def markdown_error(message: str, title: str = "bntool verify") -> str:
    """The Markdown summary for a verify that could not run."""
    return f"### {title}: could not run\n\n❌ {_md_cell(message)}\n"


def _md_cell(text: str) -> str:
    return " ".join(text.split()).replace("|", "\\|")


def verify_onnx(
    path: str | os.PathLike,
    *,
    reference: str | os.PathLike | None = None,
    input_shapes: Sequence[Sequence[int]] | None = None,
    samples: int = 4,
    seed: int = 0,
    rtol: float | None = None,
    atol: float | None = None,
    onnx_rtol: float | None = None,
    onnx_atol: float | None = None,
    provider: str = "cpu",
) -> VerifyReport:
    """The CI checks of an ONNX file: BN health (its BatchNormalization nodes' statistics), fold equivalence
    (bntool.onnx_fold's fold, checked in onnxruntime; nothing written) and, with `reference`, the file against
    another ONNX file in onnxruntime (what a CI runs after any graph rewrite: `reference` is the file before it).

    Raises:
        InputError: a file that cannot be used (see bntool.onnx_model.load_onnx), a symbolic input dimension
            without `input_shapes`, inputs that do not fit `reference`.
    """
    from .compare import Tolerance, check_samples
    from .onnx_check import DEFAULT_TOLERANCE, compare_runs
    from .onnx_fold import OriginalRuns, example_inputs, fold_onnx, inspect_onnx
    from .onnx_model import load_onnx

    check_samples(samples)
    onnx_file = load_onnx(path)
    reference_file = load_onnx(reference, check=True) if reference is not None else None
    inputs = example_inputs(onnx_file.model, input_shapes, seed, onnx_file.path)
    if reference_file is not None:
        _refuse_other_inputs(reference_file, inputs, onnx_file, input_shapes is not None)
    report = VerifyReport()
    report.checks.append(timed(lambda: health_check(inspect_onnx(onnx_file))))

    def fold() -> Check:
        try:
            return fold_check(fold_onnx(onnx_file, None, input_shapes=input_shapes, samples=samples, seed=seed,
                                        rtol=rtol, atol=atol, provider=provider, check=False))
        except BrokenStatistics as e:  # the file is at fault, which bn-health reports; the fold check fails
            name, problem = e.broken[0]
            return Check("fold-equivalence", False, f"not run: {plural(len(e.broken), 'BN layer')} cannot be "
                                                    f"folded, e.g. {name}: {problem}")
        except CheckFailed as e:
            return Check("fold-equivalence", False, str(e))

    report.checks.append(timed(fold))
    if reference_file is not None:
        del reference_file  # loaded to refuse a bad file before any check; onnxruntime reads it from disk
        tolerance = Tolerance.resolve(onnx_rtol, onnx_atol, _pair_tolerance(onnx_file.model, DEFAULT_TOLERANCE))
        assert reference is not None  # reference_file was loaded from it

        def compare() -> Check:
            runs = OriginalRuns(Path(reference), provider, inputs)
            try:
                result = compare_runs(runs, "the reference file", path, inputs, tolerance, samples=samples,
                                      seed=seed, provider=provider)
            except CheckFailed as e:
                return Check("onnx-equivalence", False, str(e))
            return _onnx_pair_check(result, tolerance, reference)

        report.checks.append(timed(compare))
    return report


def _pair_tolerance(model, float32_rule):
    """The ONNX-against-ONNX rule: float32's, or a float16 file's own (as fold's check of that file uses)."""
    from .onnx_fold import DEFAULT_TOLERANCE as FOLD_FLOAT32
    from .onnx_fold import default_tolerance

    own = default_tolerance(model)
    return own if own.atol > FOLD_FLOAT32.atol else float32_rule


def _refuse_other_inputs(reference_file, inputs, onnx_file, shapes_given: bool) -> None:
    """Exit 2 naming both files when the reference does not take the inputs the checked file takes: another
    number, the same names in another order (both files are fed by position), or other fixed sizes."""
    from .onnx_fold_check import graph_inputs

    path, reference = onnx_file.path, reference_file.path
    specs, mine = graph_inputs(reference_file.model), [i.name for i in graph_inputs(onnx_file.model)]
    theirs = [spec.name for spec in specs]
    if len(theirs) != len(mine) or (theirs != mine and sorted(theirs) == sorted(mine)):
        order = " in another order" if len(theirs) == len(mine) else ""
        raise InputError(f"{reference}: takes inputs {', '.join(theirs)}, {path} takes {', '.join(mine)}: the two "
                         f"files do not take the same inputs{order}" + (" (both are fed by position)" if order else ""))
    for spec, x in zip(specs, inputs):
        if not spec.type.tensor_type.HasField("shape"):  # no shape declared: onnxruntime judges it
            continue
        dims = [d.dim_value if d.HasField("dim_value") else d.dim_param for d in spec.type.tensor_type.shape.dim]
        if len(dims) != x.ndim or any(isinstance(d, int) and d > 0 and d != s for d, s in zip(dims, x.shape)):
            given = f" (from {param('example_inputs')})" if shapes_given else ""
            raise InputError(f"{reference}: input {spec.name!r} has shape {dims}, {path}'s is {list(x.shape)}{given}: "
                             "the two files do not take the same inputs")


def _onnx_pair_check(result, tolerance, reference) -> Check:
    failing = [c for c in result.comparisons if not c.passed]
    summary = (f"onnxruntime: this file vs {reference} on {plural(len(result.comparisons), 'input/output pair')}: "
               f"max abs {result.max_abs:.3g} ({result.max_abs_over_scale:.2g} of the output's magnitude) against "
               f"atol {result.atol_at_worst:.3g} ({tolerance.describe()})")
    if failing:
        summary += f"; {len(failing)} over tolerance, first: {failing[0].input} {failing[0].output}"
    figures = {"reference": str(reference), **result.summary_figures(), "tolerance": tolerance.to_dict(),
               "comparisons": len(result.comparisons), "notes": [*result.notes, *result.comparison_notes]}
    return Check("onnx-equivalence", result.passed, summary + noted(result), figures)
