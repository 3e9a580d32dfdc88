"""`bntool verify`: the CI checks, their JUnit and Markdown reports (also when verify cannot run or its
options do not parse)."""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path
from typing import Annotated, Optional

import typer
import typer.core

from ..choices import Exporter
from ..errors import BntoolError, CheckFailed, InputError
from ..options import (
    DataOptions,
    Device,
    Display,
    ExampleInputs,
    ImagePreprocessing,
    ModelSource,
    Tolerances,
    grouped,
)
from .app import ExporterOption, NumCheckBatches, Samples, _Command, app
from .shared import (
    _context,
    _input_shapes,
    _one_line,
    _onnx_input,
    _onnx_provider,
    _outputs,
    _require_eager,
    _say,
    _show,
    _tell,
    _warn_skipped,
    flag_name,
)


@app.command(cls=_Command)
@grouped(batch_size=8)
def verify(
    model: ModelSource,
    example: ExampleInputs,
    data: DataOptions,
    images: ImagePreprocessing,
    tolerances: Tolerances,
    device: Device,
    display: Display,
    onnx: Annotated[Optional[Path], typer.Option("--onnx", help="Check this ONNX file, not a fresh export.")] = None,
    skip_onnx: Annotated[bool, typer.Option("--skip-onnx", help="Do not check ONNX at all.")] = False,
    exporter: ExporterOption = Exporter.AUTO,
    samples: Samples = 4,
    num_batches: NumCheckBatches = 4,
    onnx_rtol: Annotated[Optional[float], typer.Option("--onnx-rtol", help="ONNX check's --rtol (default "
                                                                           "1e-4).")] = None,
    onnx_atol: Annotated[Optional[float], typer.Option("--onnx-atol", help="ONNX check's --atol (default: 1e-4 "
                                                                           "of the output's largest "
                                                                           "magnitude).")] = None,
    junit_xml: Annotated[Optional[Path], typer.Option(
        "--junit-xml", help="Also write JUnit XML here, also when verify cannot run (an errored test case).")] = None,
    summary_md: Annotated[Optional[Path], typer.Option(
        "--summary-md", help="Also write a Markdown table of the checks here (it is also appended to "
                             "$GITHUB_STEP_SUMMARY when that is set).")] = None,
    force: Annotated[bool, typer.Option("--force", help="Overwrite an existing --junit-xml or --summary-md file "
                                                        "that is not an earlier report of its kind (those are "
                                                        "replaced, as pytest's --junitxml does).")] = False,
    reference: Annotated[Optional[Path], typer.Option(
        "--reference", help="ONNX files: the ONNX file this one must match in onnxruntime (e.g. the file before "
                            "a graph rewrite).")] = None,
) -> None:
    """CI checks: BN health, folded vs original, ONNX vs PyTorch. Exit 0 only if all pass, 1 if any fails.

    --rtol/--atol apply to the fold check, --onnx-rtol/--onnx-atol to the ONNX check; both mean: an element
    passes when |Δ| ≤ atol + rtol·|reference|.
    """
    from ..report import render_verify
    from ..verification_onnx import junit_error_xml, markdown_error, to_junit_xml, to_markdown

    outputs = _outputs((model.ckpt, "the input checkpoint"), (data.data, "the --data file"), (onnx, "the --onnx file"),
                       (reference, "the --reference file"))
    _plan_ci_reports(outputs, junit_xml, summary_md, force)
    outputs.check()
    step_summary = os.environ.get("GITHUB_STEP_SUMMARY")
    try:
        if _onnx_input(model):
            report, context = _verify_onnx(model, example, data, tolerances, onnx, reference, samples, onnx_rtol,
                                           onnx_atol, _onnx_provider(device, example))
        else:
            if reference is not None:
                raise InputError("--reference: compares two ONNX files; for a PyTorch checkpoint use --onnx")
            checks = VerifyChecks(tolerances, onnx, skip_onnx, exporter, samples, num_batches, onnx_rtol, onnx_atol)
            report, context = _verify(model, example, data, images, checks, device, display)
    except Exception as e:  # the CI dashboard must say why verify could not run
        message = _one_line(e.render(flag_name) if isinstance(e, BntoolError) else
                            f"internal error: {type(e).__name__}: {e}")
        _write_ci_reports(outputs, junit_xml, junit_error_xml(message), summary_md, step_summary,
                          markdown_error(message))
        raise
    _write_ci_reports(outputs, junit_xml, to_junit_xml(report), summary_md, step_summary, to_markdown(report))
    _show(report, display, render_verify, context)
    if not report.passed:
        failed = ", ".join(c.name for c in report.checks if not c.passed)
        raise CheckFailed(f"verification failed: {failed}")


def _plan_ci_reports(outputs, junit_xml: Path | None, summary_md: Path | None, force: bool) -> None:
    """Plan verify's report files; an earlier report of the same kind (by content) is replaced without --force."""
    from ..files import OutputKind, is_junit_xml, is_markdown_report

    if junit_xml is not None:
        outputs.add(junit_xml, OutputKind.REPORT, force=force, what="--junit-xml", same_kind=is_junit_xml)
    if summary_md is not None:
        outputs.add(summary_md, OutputKind.REPORT, force=force, what="--summary-md", same_kind=is_markdown_report)


@dataclass
class VerifyChecks:
    """What verify checks and how closely: its options that belong to no group."""

    tolerances: Tolerances  # the fold check's
    onnx: Path | None  # a file to check instead of a fresh export
    skip_onnx: bool
    exporter: str
    samples: int
    num_batches: int  # of --data, checked besides the random inputs
    onnx_rtol: float | None
    onnx_atol: float | None


def _verify(model: ModelSource, example: ExampleInputs, data: DataOptions, images: ImagePreprocessing,
            checks: VerifyChecks, device: Device, display: Display):
    from ..verification import verify as verify_model

    where = device.resolve()
    loaded = model.load()
    _require_eager(loaded, "verify")
    inputs = example.build(loaded.model, notes=loaded.notes)
    batches, source = data.batches(checks.num_batches, inputs[0], model=loaded.model, image=images.image_options(),
                                   workers=images.workers, fixed_batch=checks.onnx is not None)  # a file may be fixed
    _warn_skipped(source)
    _tell(display, loaded, source)
    report = verify_model(
        loaded.model, inputs, onnx_path=checks.onnx, onnx=not checks.skip_onnx, exporter=checks.exporter,
        samples=checks.samples, seed=example.seed, rtol=checks.tolerances.rtol, atol=checks.tolerances.atol,
        onnx_rtol=checks.onnx_rtol, onnx_atol=checks.onnx_atol, data=batches, device=where)
    return report, _context(model, source, loaded)


def _verify_onnx(model, example, data, tolerances, onnx, reference, samples, onnx_rtol, onnx_atol, provider):
    from ..onnx_model import is_onnx_file
    from ..verification_onnx import verify_onnx

    if onnx is not None or data.data is not None or data.loader is not None:
        flag = "--onnx" if onnx is not None else ("--data" if data.data is not None else "--loader")
        raise InputError(f"{flag}: not used when the input is an ONNX file ({model.ckpt}); "
                         "--reference compares it with another ONNX file")
    if reference is not None and not reference.exists():
        raise InputError(f"--reference {reference}: no such file")
    if reference is not None and reference.is_dir():
        raise InputError(f"--reference {reference}: is a directory, not an ONNX file")
    if reference is not None and not is_onnx_file(reference):
        raise InputError(f"--reference {reference}: not an ONNX file")
    report = verify_onnx(model.ckpt, reference=reference, input_shapes=_input_shapes(example), samples=samples,
                         seed=example.seed, rtol=tolerances.rtol, atol=tolerances.atol, onnx_rtol=onnx_rtol,
                         onnx_atol=onnx_atol, provider=provider)
    return report, _context(model)


def _write_ci_reports(outputs, junit_xml: Path | None, xml: str, summary_md: Path | None,
                      step_summary: str | None, markdown: str) -> None:
    """Commit the planned JUnit and Markdown reports; $GITHUB_STEP_SUMMARY is appended to, as GitHub expects."""
    with outputs:
        if junit_xml is not None:
            outputs.write(junit_xml, lambda tmp: Path(tmp).write_text(xml))
        if summary_md is not None:
            outputs.write(summary_md, lambda tmp: Path(tmp).write_text(markdown))
        outputs.commit()
    if step_summary:
        _append_step_summary(outputs, step_summary, markdown)


def _append_step_summary(outputs, step_summary: str, markdown: str) -> None:
    """Append to $GITHUB_STEP_SUMMARY, an output like any other: never when it is an input, a file of an input
    folder, another output or a checkpoint (a warning says so; the run's verdict stands)."""
    from ..files import looks_like_checkpoint

    role = outputs.role_of(step_summary)
    if not role and looks_like_checkpoint(Path(step_summary)):
        role = "a PyTorch checkpoint"
    if role:
        _say(f"warning: $GITHUB_STEP_SUMMARY ({step_summary}) is {role}; the summary is not appended to it")
        return
    try:
        with open(step_summary, "a") as f:
            f.write(markdown + "\n")
    except OSError as e:
        _say(f"warning: cannot append to $GITHUB_STEP_SUMMARY ({step_summary}): {e.strerror or e}")


def _ci_reports_of_unparsed_verify(argv: list[str], message: str) -> None:
    """A verify whose options did not parse still leaves its errored JUnit case and Markdown summary for the
    CI dashboard, read from the arguments as given; a report that may not be written (exists without --force,
    would replace a checkpoint, ...) is left out: the error line has been said."""
    from ..files import Outputs
    from ..verification_onnx import junit_error_xml, markdown_error

    outputs = Outputs()
    junit_xml, summary_md = _flag_value(argv, "--junit-xml"), _flag_value(argv, "--summary-md")
    from ..onnx_save import data_files_read

    for path in _paths_named(argv, skip_values_of=("--junit-xml", "--summary-md")):
        outputs.add_input(path, "an input named on the command line")
        for data in data_files_read(path):
            outputs.add_input(data, "the external data of an input named on the command line")
    _plan_ci_reports(outputs, junit_xml, summary_md, "--force" in argv)
    try:
        outputs.check()
    except BntoolError:  # no report then; the step summary is still checked against the inputs and reports
        outputs, junit_xml, summary_md = Outputs(outputs.inputs, outputs.planned, outputs.input_names), None, None
    _write_ci_reports(outputs, junit_xml, junit_error_xml(message), summary_md,
                      os.environ.get("GITHUB_STEP_SUMMARY"), markdown_error(message))


def _paths_named(argv: list[str], skip_values_of: tuple[str, ...]) -> list[Path]:
    """Every existing file or folder the raw arguments name (as a word or after `--flag=`), except as the value of
    the `skip_values_of` flags: without parsed options, any of them may be the checkpoint, --data or --onnx."""
    paths = []
    for i, arg in enumerate(argv):
        flag, eq, value = arg.partition("=")
        if eq and flag.startswith("--"):
            arg = value if flag not in skip_values_of else ""
        elif i > 0 and argv[i - 1] in skip_values_of:
            continue
        if arg and not arg.startswith("-") and os.path.exists(arg):
            paths.append(Path(arg))
    return paths


def _flag_value(argv: list[str], flag: str) -> Path | None:
    """The value of `flag` in raw arguments (`--flag VALUE` or `--flag=VALUE`; the last one counts)."""
    value = None
    for i, arg in enumerate(argv):
        if arg == flag and i + 1 < len(argv):
            value = argv[i + 1]
        elif arg.startswith(flag + "="):
            value = arg[len(flag) + 1:]
    return Path(value) if value else None
